"""Evaluation metrics as plain functions on tensors (no Lightning, no state)."""

from __future__ import annotations

import torch


def top1_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return (predicted == labels).float().mean().item()


def coverage_at_precision(confidence: torch.Tensor, correct: torch.Tensor, precision: float) -> float:
    """Largest fraction of queries that can be answered with precision >= ``precision``.

    Answers are taken in decreasing confidence; every confidence threshold answers all queries at or
    above it, so equal confidences enter together (one step). Coverage is the largest answered
    fraction over all thresholds whose answered set has precision >= ``precision`` (0 if none has),
    the metric of the one-shot face benchmark used by the Doppelganger paper.
    """
    n = len(confidence)
    if n == 0:
        return float("nan")
    order = torch.argsort(confidence, descending=True, stable=True)
    conf, hits = confidence[order], correct[order].to(torch.float64)
    answered = torch.arange(1, n + 1, dtype=torch.float64)
    precision_at = hits.cumsum(0) / answered
    # Only the last position of each run of equal confidences is a real threshold.
    step_end = torch.ones(n, dtype=torch.bool)
    step_end[:-1] = conf[1:] != conf[:-1]
    ok = step_end & (precision_at >= precision - 1e-12)
    if not ok.any():
        return 0.0
    return answered[ok].max().item() / n


def classify_by_prototypes(
    queries: torch.Tensor, prototypes: torch.Tensor, prototype_labels: torch.Tensor, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest prototype by cosine similarity (inputs L2-normalised): (predicted label, similarity)."""
    predicted, confidence = [], []
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ prototypes.T
        best, index = sims.max(dim=1)
        predicted.append(prototype_labels[index])
        confidence.append(best)
    if not predicted:
        return prototype_labels.new_empty(0), queries.new_empty(0)
    return torch.cat(predicted), torch.cat(confidence)


def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, k: int = 1, chunk: int = 4096) -> float:
    """Recall@K (leave-one-out retrieval): share of images whose K nearest others hold a same-label one.

    Images whose label occurs once are skipped (they cannot be retrieved). Cosine similarity on
    L2-normalised embeddings, computed in chunks so no N x N matrix is held.
    """
    counts = torch.bincount(labels - labels.min())
    has_pair = counts[labels - labels.min()] > 1
    hits, total = 0, 0
    for start in range(0, len(embeddings), chunk):
        stop = min(start + chunk, len(embeddings))
        sims = embeddings[start:stop] @ embeddings.T
        sims[torch.arange(stop - start), torch.arange(start, stop)] = float("-inf")
        neighbours = sims.topk(min(k, len(embeddings) - 1), dim=1).indices
        found = (labels[neighbours] == labels[start:stop, None]).any(dim=1)
        keep = has_pair[start:stop]
        hits += int(found[keep].sum())
        total += int(keep.sum())
    return hits / total if total else float("nan")
