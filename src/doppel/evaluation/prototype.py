"""Prototype identification, the Doppelganger paper's evaluation (sec. 4.2.6-4.2.7) on a base / novel split.

What each part of the data is to this protocol:

- every base (trained) class has a prototype: with ``base_prototypes=mean`` (the paper's) the normalised
  mean embedding of its ``Part.TRAIN`` images; with ``base_prototypes=classifier`` the normalised class
  vector of the loss's classifier term (its weight row or centre), which needs no training image embedded;
- ``Part.HELD_OUT`` images are base queries;
- ``Part.REFERENCE`` images of a novel (test) class are its one-shot prototypes;
- ``Part.QUERY`` images are novel queries.

Each query is classified among *all* prototypes, base and novel, by cosine similarity, its confidence
being that similarity, whether or not the data has base queries; top-1 accuracy and coverage at 99% /
99.9% precision are reported per split (base, novel), with Recall@1 over all images of the split (base:
TRAIN and HELD_OUT, so only with ``mean``). Embeddings use the paper's mirror trick by default.
"""

from __future__ import annotations

from typing import Any

import torch

from doppel.data.dataset import Part, in_parts
from doppel.evaluation.metrics import (
    classify_by_prototypes,
    coverage_at_precision,
    precision_coverage_curve,
    recall_at_k,
    top1_accuracy,
)
from doppel.evaluation.protocol import DataFacts, Inputs, Protocol, Result, normalize_blocks

SPLITS = {"base": (Part.HELD_OUT, (Part.TRAIN, Part.HELD_OUT)), "novel": (Part.QUERY, (Part.REFERENCE, Part.QUERY))}


BASE_PROTOTYPES = ("mean", "classifier")


def prototype_metrics(embeddings: torch.Tensor, labels: torch.Tensor, parts: torch.Tensor,
                      precisions: tuple[float, ...] = (0.99, 0.999),
                      curves: dict[str, Any] | None = None, blocks: int = 1,
                      class_vectors: torch.Tensor | None = None) -> dict[str, float]:
    """Metrics ``{split}/{metric}`` for split in (base, novel) from L2-normalised embeddings (an ensemble's
    ``blocks`` normalised each, and so each network's prototype); with ``curves``, each split's
    precision-coverage curve is stored in it. Base prototypes are the mean of each base class's TRAIN
    embeddings or, given ``class_vectors`` ([base classes, D], row = run label), those normalised."""
    embeddings = embeddings.float()
    if class_vectors is None:
        base_train = parts == Part.TRAIN
        base_ids = torch.unique(labels[base_train])
        index = torch.searchsorted(base_ids, labels[base_train])
        sums = embeddings.new_zeros(len(base_ids), embeddings.shape[1]).index_add_(0, index, embeddings[base_train])
    else:
        base_ids, sums = torch.arange(len(class_vectors)), class_vectors.float().cpu()
    references = parts == Part.REFERENCE
    prototypes = torch.cat([normalize_blocks(sums, blocks), embeddings[references]])
    prototype_labels = torch.cat([base_ids, labels[references]])

    results: dict[str, float] = {}
    for split, (query_part, member_parts) in SPLITS.items():
        queries = parts == query_part
        if not queries.any():
            continue
        members = in_parts(parts, set(member_parts))
        predicted, confidence = classify_by_prototypes(embeddings[queries], prototypes, prototype_labels)
        correct = predicted == labels[queries]
        results[f"{split}/top1"] = top1_accuracy(predicted, labels[queries])
        for p in precisions:
            results[f"{split}/coverage@{p}"] = coverage_at_precision(confidence, correct, p)
        if split == "novel" or class_vectors is None:  # base Recall@1 searches the TRAIN images
            results[f"{split}/recall@1"] = recall_at_k(embeddings[members], labels[members], k=1)
        if curves is not None:
            curves[split] = precision_coverage_curve(confidence, correct)
    return results


class PrototypeProtocol(Protocol):
    headline = "novel/coverage@0.99"
    key = "prototype"  # its node under eval, for messages
    prefix = ""  # of its metric names: {prefix}{split}/{measure}

    def __init__(self, flip: bool = True, precisions: tuple[float, ...] = (0.99, 0.999),
                 base_prototypes: str = "mean") -> None:
        for p in precisions:
            if not 0 < p <= 1:
                raise ValueError(f"eval.{self.key}.precisions: {p} must be in (0, 1].")
        if base_prototypes not in BASE_PROTOTYPES:
            raise ValueError(f"eval.{self.key}.base_prototypes={base_prototypes!r} must be one of {BASE_PROTOTYPES}: "
                             "mean (of each class's training embeddings, the paper's) or classifier (the loss's "
                             "normalised class weights).")
        self.base_prototypes = base_prototypes
        self.needs_classifier = base_prototypes == "classifier"
        self.flip, self.precisions = flip, tuple(float(p) for p in precisions)
        self.headline_measure = f"coverage@{self.precisions[0]}" if self.precisions else "top1"
        self.headline = f"{self.prefix}novel/{self.headline_measure}"
        self.splits: list[str] = list(SPLITS)
        self.has_base_classes = True  # the data has TRAIN images (settled by bind)

    def bind(self, facts: DataFacts) -> None:
        self.splits = [split for split, (query, _) in SPLITS.items() if facts.has(query)]
        if "novel" in self.splits and not facts.has(Part.REFERENCE):
            raise ValueError(f"eval.{self.key}: the data has novel queries but no reference (prototype) images; "
                             "mark one image per test class as its prototype (docs/data.md).")
        if not self.splits:
            raise ValueError(f"eval.{self.key} needs base queries (held-out images of trained classes) or novel "
                             "classes: set data.novel_fraction > 0 or data.base_queries=true, or choose another "
                             "protocol (eval=retrieval, eval=classification).")
        split = "novel" if "novel" in self.splits else self.splits[0]
        self.headline = f"{self.prefix}{split}/{self.headline_measure}"
        self.has_base_classes = facts.has(Part.TRAIN)

    def parts(self) -> set[Part]:
        """Every query competes with every prototype: the base classes' TRAIN images are embedded for their
        mean prototypes whether or not the data has base queries."""
        parts = {Part.REFERENCE, Part.QUERY} if "novel" in self.splits else set()
        parts |= {Part.HELD_OUT} if "base" in self.splits else set()
        return parts | ({Part.TRAIN} if self.base_prototypes == "mean" and self.has_base_classes else set())

    def measures(self, split: str = "novel") -> list[str]:
        recall = [] if split == "base" and self.base_prototypes == "classifier" else ["recall@1"]
        return ["top1", *(f"coverage@{p}" for p in self.precisions), *recall]

    def metric_names(self) -> list[str]:
        return [f"{self.prefix}{split}/{measure}" for split in self.splits for measure in self.measures(split)]

    def evaluate(self, inputs: Inputs) -> Result:
        split = inputs.split.of_parts(self.parts())
        vectors = None
        if self.base_prototypes == "classifier":
            if inputs.class_vectors is None:
                raise ValueError(f"eval.{self.key}.base_prototypes=classifier needs the loss's classifier, and this "
                                 "evaluation has none: use base_prototypes=mean.")
            vectors = inputs.class_vectors()
        curves: dict[str, Any] = {}
        metrics = prototype_metrics(split.fused(self.flip), split.labels, split.parts, self.precisions, curves,
                                    split.blocks, vectors)
        return Result(metrics, curves)

    def figures(self, result: Result) -> list[tuple[str, Any]]:
        from doppel.evaluation.plots import precision_coverage_figure

        if not result.curves:
            return []
        return [("precision_coverage", precision_coverage_figure(result.curves, self.precisions))]

    def summary(self, metrics: dict[str, float]) -> list[str]:
        rows = [f"{'metric':<16}" + "".join(f"{split:>10}" for split in self.splits)]
        rows += [f"{measure:<16}" + "".join(f"{_percent(metrics.get(f'{self.prefix}{split}/{measure}')):>10}"
                                            for split in self.splits) for measure in self.measures("novel")]
        return rows


def _percent(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}%"
