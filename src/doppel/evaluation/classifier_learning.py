"""Classifier learning, the Doppelganger paper's second stage (sec. 4.2.8, Table 6), on a base / novel split.

The trained network is frozen and its base classifier dropped. A new (base + novel)-way L2-Softmax
layer (scores ``W (alpha f / ||f||) + b``) starts from each identity's prototype as its weights (the
normalised mean embedding of its ``Part.TRAIN`` images, or its one ``Part.REFERENCE`` image), with zero
bias and ``alpha`` = ``scale``, and is trained alone: ``iterations`` steps of Nesterov SGD, the learning
rate decaying from ``lr`` to ``lr_end`` (cosine), each batch one image of each of ``batch_size`` distinct
classes drawn at random (N_r = N_c: no mining, no exemplar loss). Base queries (``Part.HELD_OUT``) and
novel queries (``Part.QUERY``) are classified by its scores, with the softmax probability of the answer
as confidence: top-1 and coverage at each precision per split.

The network is frozen, so each image's embedding (with the mirror trick where training mirrors) is
computed once and the layer trains on those.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from doppel.data.dataset import Part
from doppel.evaluation.metrics import coverage_at_precision, precision_coverage_curve, top1_accuracy
from doppel.evaluation.protocol import Inputs, Result
from doppel.evaluation.prototype import SPLITS, PrototypeProtocol


def class_prototypes(embeddings: torch.Tensor, labels: torch.Tensor, parts: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(classes, [classes, D] normalised mean of each class's TRAIN or REFERENCE embeddings)."""
    known = (parts == Part.TRAIN) | (parts == Part.REFERENCE)
    classes, index = torch.unique(labels[known], return_inverse=True)
    sums = embeddings.new_zeros(len(classes), embeddings.shape[1]).index_add_(0, index, embeddings[known])
    return classes, F.normalize(sums, dim=1)


def draw_batches(labels: torch.Tensor, num_classes: int, batch_size: int, iterations: int,
                 generator: torch.Generator) -> list[torch.Tensor]:
    """Per iteration, the positions of one random image of each of ``batch_size`` distinct random classes
    (``labels``: class index 0..num_classes-1 of every training embedding)."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    batches = []
    for _ in range(iterations):
        classes = torch.randperm(num_classes, generator=generator)[:batch_size]
        offsets = (torch.rand(len(classes), generator=generator) * counts[classes]).long()
        batches.append(order[starts[classes] + offsets])
    return batches


class ClassifierLearningProtocol(PrototypeProtocol):
    key = "classifier_learning"
    prefix = "classifier_learning/"

    def __init__(self, iterations: int = 500, batch_size: int = 81, lr: float = 0.001, lr_end: float = 0.0001,
                 momentum: float = 0.9, weight_decay: float = 5e-4, scale: float = 16.0,
                 trainable_scale: bool = True, flip: bool = True, precisions: tuple[float, ...] = (0.99, 0.999),
                 seed: int = 0) -> None:
        super().__init__(flip, precisions)
        for key, value in (("iterations", iterations), ("batch_size", batch_size)):
            if not isinstance(value, int) or value < (0 if key == "iterations" else 1):
                raise ValueError(f"eval.classifier_learning.{key}={value} must be a "
                                 f"{'non-negative' if key == 'iterations' else 'positive'} integer.")
        if not 0 < lr_end <= lr:
            raise ValueError(f"eval.classifier_learning: lr_end={lr_end} must be in (0, lr={lr}].")
        self.iterations, self.batch_size, self.lr, self.lr_end = iterations, batch_size, lr, lr_end
        self.momentum, self.weight_decay = momentum, weight_decay
        self.scale, self.trainable_scale, self.seed = scale, trainable_scale, seed

    def parts(self) -> set[Part]:
        return super().parts() | {Part.TRAIN}  # the base classes' initial weights

    def measures(self, split: str = "novel") -> list[str]:
        return ["top1", *(f"coverage@{p}" for p in self.precisions)]

    def train_classifier(self, embeddings: torch.Tensor, labels: torch.Tensor, parts: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.nn.Linear, torch.Tensor]:
        """(classes, the trained layer, its scale); the layer's row i scores ``classes[i]``."""
        classes, prototypes = class_prototypes(embeddings, labels, parts)
        layer = torch.nn.Linear(embeddings.shape[1], len(classes))
        with torch.no_grad():
            layer.weight.copy_(prototypes)
            layer.bias.zero_()
        scale = torch.nn.Parameter(torch.tensor(float(self.scale)), requires_grad=self.trainable_scale)
        params = [layer.weight, layer.bias] + ([scale] if self.trainable_scale else [])
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, nesterov=self.momentum > 0,
                                    weight_decay=self.weight_decay)
        known = (parts == Part.TRAIN) | (parts == Part.REFERENCE)
        features = F.normalize(embeddings[known], dim=1)
        targets = torch.searchsorted(classes, labels[known])
        generator = torch.Generator().manual_seed(self.seed)
        batches = draw_batches(targets, len(classes), min(self.batch_size, len(classes)), self.iterations, generator)
        for step, batch in enumerate(batches):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(step, self.iterations, self.lr, self.lr_end)
            loss = F.cross_entropy(layer(scale * features[batch]), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return classes, layer, scale.detach()

    def evaluate(self, inputs: Inputs) -> Result:
        split = inputs.split.of_parts(self.parts())
        embeddings, labels, parts = split.fused(self.flip).float(), split.labels, split.parts
        # evaluation runs under inference mode: the layer trains outside it, on an ordinary copy
        with torch.inference_mode(False), torch.enable_grad():
            classes, layer, scale = self.train_classifier(embeddings.clone(), labels.clone(), parts.clone())
        results: dict[str, float] = {}
        curves: dict[str, Any] = {}
        for name, (query_part, _) in SPLITS.items():
            queries = parts == query_part
            if name not in self.splits or not queries.any():
                continue
            with torch.no_grad():
                probabilities = F.softmax(layer(scale * F.normalize(embeddings[queries], dim=1)), dim=1)
            confidence, index = probabilities.max(dim=1)
            predicted, truth = classes[index], labels[queries]
            correct = predicted == truth
            results[f"{self.prefix}{name}/top1"] = top1_accuracy(predicted, truth)
            for p in self.precisions:
                results[f"{self.prefix}{name}/coverage@{p}"] = coverage_at_precision(confidence, correct, p)
            curves[name] = precision_coverage_curve(confidence, correct)
        return Result(results, curves)

    def figures(self, result: Result) -> list[tuple[str, Any]]:
        from doppel.evaluation.plots import precision_coverage_figure

        if not result.curves:
            return []
        return [("classifier_precision_coverage", precision_coverage_figure(result.curves, self.precisions))]


def cosine_lr(step: int, steps: int, start: float, end: float) -> float:
    """SGDR without restarts: ``start`` at step 0, ``end`` at the last step."""
    if steps <= 1:
        return start
    return end + (start - end) * (1 + math.cos(math.pi * step / (steps - 1))) / 2
