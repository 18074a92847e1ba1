"""What an evaluation protocol is: it picks evaluation sets of the data, and scores their embeddings.

The LightningModule only embeds; :class:`~doppel.evaluation.evaluator.Evaluator` collects the embeddings
of every set (gathered across processes) and hands each protocol what it asked for. A protocol is one
file in this package plus one file in ``configs/eval/``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from doppel.data.dataset import ImageSet, Part, in_parts


@dataclass
class DataFacts:
    """What a protocol may know of the data before anything is embedded."""

    parts: torch.Tensor  # Part of every image of the split
    references_given: bool  # the files name the test classes' references (In-Shop's gallery)
    benchmark: str | None  # cub, cars, sop, inshop, cifar10, cifar100, mnist, or None
    folder: Any  # the data folder (a Path) or None
    locate: Callable[[str, str], Any]  # (path, setting key) -> Path of a file given by path or name
    labels: torch.Tensor | None = None  # run label of every image of the split

    def has(self, part: Part) -> bool:
        return bool((self.parts == part).any())


@dataclass
class Embedded:
    """Embeddings (float32, as the backbone outputs them, not normalised) of one evaluation set, in item
    order; ``flipped`` are those of the mirrored images (None when no protocol fuses them)."""

    plain: torch.Tensor
    flipped: torch.Tensor | None
    labels: torch.Tensor | None = None  # split images: their run labels
    parts: torch.Tensor | None = None  # split images: their Part
    blocks: int = 1  # an ensemble's networks, side by side (each block normalised on its own)

    def fused(self, flip: bool, normalise: bool = True) -> torch.Tensor:
        """The mirror trick when ``flip`` (the image's and its mirror's embeddings summed), L2-normalised
        (an ensemble: each network's block, so that dot products are the mean of the networks' cosines)."""
        embeddings = self.plain + self.flipped if flip else self.plain
        return normalize_blocks(embeddings, self.blocks) if normalise else embeddings

    def of_parts(self, parts: set[Part]) -> Embedded:
        """The split images in any of ``parts``."""
        mask = in_parts(self.parts, parts)
        return Embedded(self.plain[mask], None if self.flipped is None else self.flipped[mask], self.labels[mask],
                        self.parts[mask], self.blocks)


def normalize_blocks(embeddings: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """Each of ``blocks`` equal column blocks L2-normalised, scaled by 1 / sqrt(blocks): rows of unit norm
    whose dot product is the mean of the blocks' cosine similarities."""
    if blocks == 1:
        return F.normalize(embeddings, dim=1)
    parts = embeddings.unflatten(1, (blocks, -1))
    return (F.normalize(parts, dim=2) / blocks ** 0.5).flatten(1)


@dataclass
class Result:
    """What one protocol's evaluation gives: its metrics and the curves its figures draw (e.g. split ->
    (coverage, precision)); a value, so that a protocol keeps nothing between calls."""

    metrics: dict[str, float]
    curves: dict[str, Any] = field(default_factory=dict)


@dataclass
class Inputs:
    """What :meth:`Protocol.evaluate` receives."""

    split: Embedded | None  # the split images of the parts any protocol asked for, ascending positions
    pairs: dict[str, Embedded] = field(default_factory=dict)  # pair set name -> its images' embeddings
    classify: Callable[[torch.Tensor], torch.Tensor] | None = None  # raw embeddings -> class scores
    class_vectors: Callable[[], torch.Tensor] | None = None  # -> [base classes, D] the classifier's class vectors


class Protocol(ABC):
    """One way of scoring embeddings. Metric names are relative (``train()`` prefixes ``test/``)."""

    flip: bool = True
    headline: str  # the metric ``objective=auto`` optimises when this protocol is listed first
    needs_classifier: bool = False  # scores with the training classifier (the loss's classifier term)

    @abstractmethod
    def bind(self, facts: DataFacts) -> None:
        """Check that the data can be evaluated this way (a clear error if not) and settle the metric
        names; called once, after the data is read and before training."""

    def parts(self) -> set[Part]:
        """Parts of the split whose images this protocol needs embedded."""
        return set()

    def pair_sets(self) -> dict[str, ImageSet]:
        """Image sets (name -> a verification pack, an IJB release, ...) whose images this protocol needs
        embedded, each in its own order."""
        return {}

    @abstractmethod
    def metric_names(self) -> list[str]:
        """Every metric :meth:`evaluate` returns for the bound data."""

    @abstractmethod
    def evaluate(self, inputs: Inputs) -> Result:
        """The metrics and the curves of one evaluation."""

    def figures(self, result: Result) -> list[tuple[str, Any]]:
        """(file stem, matplotlib figure) of a result's curves."""
        return []

    def summary(self, metrics: dict[str, float]) -> list[str]:
        """Lines of the final table printed for this protocol (``metrics`` without the ``test/`` prefix)."""
        return [f"{name}: {_shown(metrics.get(name))}" for name in self.metric_names()]


def _shown(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"
