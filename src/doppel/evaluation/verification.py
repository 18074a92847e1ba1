"""Face verification on pairs (LFW, CFP-FP, AgeDB-30 ``.bin`` packs): 10-fold accuracy as InsightFace's
``verification.evaluate`` computes it.

Embeddings (each already the sum of the image's and its mirror's, the "flip" fusion) are L2-normalised;
a pair's distance is the squared L2 distance; thresholds are 0, 0.01, ..., 3.99; the pairs are split into
10 contiguous folds (scikit-learn's unshuffled KFold: the first ``pairs % 10`` folds one pair larger); in
each fold the threshold with the best accuracy on the other 9 folds (the first of equals) is applied to
it. Reported: the mean and the standard deviation (ddof 0) of the 10 fold accuracies.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

THRESHOLDS = torch.from_numpy(np.arange(0, 4, 0.01))  # numpy's values, as InsightFace uses them


def fold_bounds(count: int, folds: int) -> list[tuple[int, int]]:
    """[start, stop) of each contiguous fold, the first ``count % folds`` one larger."""
    sizes = [count // folds + (1 if f < count % folds else 0) for f in range(folds)]
    starts = np.cumsum([0, *sizes])
    return [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]


def verification_accuracy(embeddings: torch.Tensor, issame: torch.Tensor, folds: int = 10) -> dict[str, float]:
    """``embeddings``: [2P, D], pair i = rows 2i and 2i + 1; ``issame``: bool [P]."""
    if len(embeddings) != 2 * len(issame) or len(issame) < folds:
        raise ValueError(f"{len(embeddings)} embeddings for {len(issame)} pairs: verification needs 2 per pair and "
                         f"at least {folds} pairs.")
    unit = F.normalize(embeddings.double(), dim=1)
    distance = (unit[0::2] - unit[1::2]).square().sum(1)
    correct = (distance[None, :] < THRESHOLDS[:, None]) == issame.bool()[None, :]  # [thresholds, pairs]
    accuracies = []
    for start, stop in fold_bounds(len(issame), folds):
        held_out = torch.zeros(len(issame), dtype=torch.bool)
        held_out[start:stop] = True
        best = int(torch.argmax(correct[:, ~held_out].double().mean(1)))  # the first of equal maxima
        accuracies.append(correct[best, held_out].double().mean())
    accuracy = torch.stack(accuracies)
    return {"accuracy": float(accuracy.mean()), "accuracy_std": float(accuracy.std(unbiased=False))}


def tar_at_far(scores: torch.Tensor, issame: torch.Tensor, far: float) -> float:
    """True accept rate at a false accept rate of at most ``far``: the share of genuine pairs scoring above
    the lowest threshold that accepts at most ``far`` of the impostor pairs (higher score = more alike, e.g.
    cosine similarity); the ROC point scikit-learn's ``roc_curve`` gives as max TPR with FPR <= far."""
    issame = issame.bool()
    genuine, impostor = scores[issame].double(), scores[~issame].double()
    if len(genuine) == 0 or len(impostor) == 0:
        raise ValueError(f"TAR@FAR needs genuine and impostor pairs; got {len(genuine)} and {len(impostor)}.")
    allowed = int(far * len(impostor) + 1e-9)  # impostors that may be accepted
    if allowed >= len(impostor):
        return 1.0
    # Accept only scores above the (allowed + 1)-th highest impostor: it and its ties are rejected.
    bound = impostor.sort(descending=True).values[allowed]
    return float((genuine > bound).double().mean())
