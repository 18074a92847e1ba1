"""Verification accuracy against a naive re-implementation of InsightFace's procedure (its loops, numpy,
scikit-learn's KFold and normalize), written here from its definition."""

import numpy as np
import pytest
import torch
from sklearn.model_selection import KFold
from sklearn.preprocessing import normalize

from doppel.evaluation.verification import verification_accuracy


def insightface_accuracy(embeddings: np.ndarray, issame: np.ndarray, folds: int = 10) -> tuple[float, float]:
    embeddings = normalize(embeddings)
    e1, e2 = embeddings[0::2], embeddings[1::2]
    thresholds = np.arange(0, 4, 0.01)
    dist = np.sum(np.square(e1 - e2), 1)
    accuracy = np.zeros(folds)

    def acc(threshold, d, same):
        predict = np.less(d, threshold)
        tp = np.sum(np.logical_and(predict, same))
        tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(same)))
        return float(tp + tn) / d.size

    for fold, (train, test) in enumerate(KFold(n_splits=folds, shuffle=False).split(np.arange(len(issame)))):
        train_accuracy = np.array([acc(t, dist[train], issame[train]) for t in thresholds])
        accuracy[fold] = acc(thresholds[np.argmax(train_accuracy)], dist[test], issame[test])
    return float(np.mean(accuracy)), float(np.std(accuracy))


@pytest.mark.parametrize("pairs", [60, 123, 607])  # 123, 607: the folds differ in size (layout matters)
def test_matches_the_insightface_procedure(pairs):
    generator = torch.Generator().manual_seed(pairs)
    issame = torch.rand(pairs, generator=generator) < 0.5
    base = torch.randn(pairs, 16, generator=generator, dtype=torch.float64)
    noise = torch.randn(pairs, 16, generator=generator, dtype=torch.float64)
    other = torch.randn(pairs, 16, generator=generator, dtype=torch.float64)
    partner = torch.where(issame[:, None], base + 1.2 * noise, other)
    embeddings = torch.stack([base, partner], 1).flatten(0, 1)  # pair i: rows 2i, 2i + 1
    ours = verification_accuracy(embeddings, issame)
    mean, std = insightface_accuracy(embeddings.numpy(), issame.numpy())
    assert ours["accuracy"] == pytest.approx(mean, abs=1e-12) and ours["accuracy_std"] == pytest.approx(std, abs=1e-12)
    assert 0.6 < mean < 0.99 and std > 0  # a case where thresholds and folds matter


def test_perfect_and_hand_computed_cases():
    same = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    different = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # squared distance 2
    embeddings = torch.cat([same, different] * 10)
    assert verification_accuracy(embeddings, torch.tensor([True, False] * 10))["accuracy"] == 1.0
    # every pair identical but labelled different: no threshold above 0 is right; threshold 0 is, always
    assert verification_accuracy(torch.cat([same] * 20), torch.zeros(20, dtype=torch.bool))["accuracy"] == 1.0
    with pytest.raises(ValueError, match="2 per pair"):
        verification_accuracy(torch.zeros(5, 2), torch.zeros(2, dtype=torch.bool))


@pytest.mark.parametrize("quantised", [False, True])
@pytest.mark.parametrize("far", [1e-3, 1e-2, 0.1, 0.25])
def test_tar_at_far_is_the_roc_point_of_scikit_learn(far, quantised):
    from sklearn.metrics import roc_curve

    from doppel.evaluation.verification import tar_at_far

    generator = torch.Generator().manual_seed(int(far * 1e4))
    issame = torch.rand(3000, generator=generator) < 0.3
    scores = torch.where(issame, 0.6 + 0.2 * torch.randn(3000, generator=generator),
                         0.2 * torch.randn(3000, generator=generator)).double()
    if quantised:
        scores = (scores * 50).round() / 50  # ties, as quantised similarities have
    fpr, tpr, _ = roc_curve(issame.numpy(), scores.numpy())
    assert tar_at_far(scores, issame, far) == pytest.approx(tpr[fpr <= far + 1e-12].max(), abs=1e-12)
