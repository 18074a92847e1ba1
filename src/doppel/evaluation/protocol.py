"""The Doppelganger paper's evaluation (sec. 4.2.6-4.2.7) on a base / novel split.

Every identity gets one prototype: the normalised mean embedding of its training images (base) or the
embedding of its single one-shot image (novel). Each query is classified among *all* prototypes by
cosine similarity, its confidence being that similarity; top-1 accuracy and coverage at 99% / 99.9%
precision are reported per split, with Recall@1 over all images of the split.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from doppel.data.dataset import Role
from doppel.evaluation.metrics import classify_by_prototypes, coverage_at_precision, recall_at_k, top1_accuracy

PRECISIONS = (0.99, 0.999)
SPLITS = ("base", "novel")


def metric_names() -> list[str]:
    """``{split}/{metric}`` of every metric :func:`evaluate_protocol` reports."""
    return [f"{split}/{metric}" for split in SPLITS
            for metric in ("top1", *(f"coverage@{p}" for p in PRECISIONS), "recall@1")]


def mirror_embed(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The "mirror trick" (sec. 4.2.3): embeddings of the image and its mirror summed, then normalised."""
    return F.normalize(model(images) + model(images.flip(-1)), dim=1)


def evaluate_protocol(embeddings: torch.Tensor, labels: torch.Tensor, roles: torch.Tensor) -> dict[str, float]:
    """Metrics ``{split}/{metric}`` for split in (base, novel) from L2-normalised embeddings."""
    embeddings = embeddings.float()
    base_train = roles == Role.BASE_TRAIN
    base_ids = torch.unique(labels[base_train])
    index = torch.searchsorted(base_ids, labels[base_train])
    sums = embeddings.new_zeros(len(base_ids), embeddings.shape[1]).index_add_(0, index, embeddings[base_train])
    novel_proto = roles == Role.NOVEL_PROTOTYPE
    prototypes = torch.cat([F.normalize(sums, dim=1), embeddings[novel_proto]])
    prototype_labels = torch.cat([base_ids, labels[novel_proto]])

    results: dict[str, float] = {}
    for split, query_role, members in (
        ("base", Role.BASE_TEST, (roles == Role.BASE_TRAIN) | (roles == Role.BASE_TEST)),
        ("novel", Role.NOVEL_QUERY, (roles == Role.NOVEL_PROTOTYPE) | (roles == Role.NOVEL_QUERY)),
    ):
        queries = roles == query_role
        if not queries.any():
            continue
        predicted, confidence = classify_by_prototypes(embeddings[queries], prototypes, prototype_labels)
        correct = predicted == labels[queries]
        results[f"{split}/top1"] = top1_accuracy(predicted, labels[queries])
        for p in PRECISIONS:
            results[f"{split}/coverage@{p}"] = coverage_at_precision(confidence, correct, p)
        results[f"{split}/recall@1"] = recall_at_k(embeddings[members], labels[members], k=1)
    return results
