"""Retrieval metrics against pytorch-metric-learning's AccuracyCalculator (k covering the largest class)
and against naive loops written from the definitions."""

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from doppel.evaluation.metrics import recall_at_k, retrieval_metrics

PML = {"precision@1": "precision_at_1", "r_precision": "r_precision", "map@r": "mean_average_precision_at_r"}


def clustered(n_classes: int, seed: int, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Classes of 1-6 items (some alone: they cannot be retrieved) around noisy centres."""
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 7, (n_classes,), generator=generator)
    labels = torch.repeat_interleave(torch.arange(n_classes), sizes)
    centres = torch.randn(n_classes, dim, generator=generator)
    points = centres[labels] + 0.8 * torch.randn(len(labels), dim, generator=generator)
    order = torch.randperm(len(labels), generator=generator)
    return F.normalize(points[order], dim=1), labels[order]


def pml(query, query_labels, reference=None, reference_labels=None):
    calculator = AccuracyCalculator(include=tuple(PML.values()), k="max_bin_count",
                                    knn_func=CustomKNN(CosineSimilarity()))
    result = calculator.get_accuracy(query, query_labels, reference, reference_labels)
    return {ours: result[theirs] for ours, theirs in PML.items()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_leave_one_out_matches_pytorch_metric_learning(seed):
    embeddings, labels = clustered(40, seed)
    ours = retrieval_metrics(embeddings, labels, ks=(1,), chunk=17)
    theirs = pml(embeddings, labels)
    for name in PML:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name
    assert 0.2 < ours["map@r"] < 0.95  # neither trivial nor hopeless


def test_query_against_gallery_matches_pytorch_metric_learning():
    embeddings, labels = clustered(50, 7)
    queries, gallery = embeddings[::3], torch.cat([embeddings[1::3], embeddings[2::3]])
    query_labels, gallery_labels = labels[::3], torch.cat([labels[1::3], labels[2::3]])
    ours = retrieval_metrics(queries, query_labels, gallery, gallery_labels, chunk=5)
    theirs = pml(queries, query_labels, gallery, gallery_labels)
    for name in PML:
        assert ours[name] == pytest.approx(theirs[name], abs=1e-6), name


def naive_recall(embeddings, labels, k, gallery=None, gallery_labels=None):
    hits, total = 0, 0
    for i in range(len(embeddings)):
        others = [(float(embeddings[i] @ gallery[j]), int(gallery_labels[j])) for j in range(len(gallery))] \
            if gallery is not None else \
            [(float(embeddings[i] @ embeddings[j]), int(labels[j])) for j in range(len(embeddings)) if j != i]
        if not any(label == int(labels[i]) for _, label in others):
            continue
        nearest = sorted(others, key=lambda pair: -pair[0])[:k]
        hits += any(label == int(labels[i]) for _, label in nearest)
        total += 1
    return hits / total


def test_recall_at_k_matches_a_naive_loop_in_both_modes():
    embeddings, labels = clustered(30, 3)
    ours = retrieval_metrics(embeddings, labels, ks=(1, 2, 4, 8), chunk=9)
    for k in (1, 2, 4, 8):
        assert ours[f"recall@{k}"] == pytest.approx(naive_recall(embeddings, labels, k))
        assert recall_at_k(embeddings, labels, k) == pytest.approx(naive_recall(embeddings, labels, k))
    queries, gallery = embeddings[:40], embeddings[40:]
    ours = retrieval_metrics(queries, labels[:40], gallery, labels[40:], ks=(1, 4))
    for k in (1, 4):
        assert ours[f"recall@{k}"] == pytest.approx(naive_recall(queries, labels[:40], k, gallery, labels[40:]))


def test_a_query_is_masked_by_its_index_only():
    """Near-copies (cosine ~ 1 - 1e-7) of 6 points under other labels: each original's nearest other item is
    its twin (a miss). Masking the query by index keeps the twin, as the naive loop does; masking
    similarities of about 1 (by value) would hide it, and no mask would return the query itself."""
    embeddings, labels = clustered(30, 5)
    nudge = 1e-3 * torch.randn(6, embeddings.shape[1], generator=torch.Generator().manual_seed(0))
    twins = torch.cat([embeddings, F.normalize(embeddings[:6] + nudge, dim=1)])
    twin_labels = torch.cat([labels, labels[:6] + 1000])
    ours = retrieval_metrics(twins, twin_labels, ks=(1, 2), chunk=11)
    for k in (1, 2):
        assert ours[f"recall@{k}"] == pytest.approx(naive_recall(twins, twin_labels, k))
    assert ours["recall@1"] < retrieval_metrics(embeddings, labels, ks=(1,))["recall@1"]
