"""Closed-set classification, the IE paper's MNIST / CIFAR protocol (Tables 2-4): the training
classifier's top-1 accuracy on held-out images of the trained classes (the test set)."""

from __future__ import annotations

import torch

from doppel.data.dataset import Part
from doppel.evaluation.protocol import DataFacts, Inputs, Protocol, Result


class ClassificationProtocol(Protocol):
    headline = "classification/top1"
    needs_classifier = True

    def __init__(self, flip: bool = False) -> None:
        self.flip = flip  # off: mirrored digits are other symbols; the IE paper scores the image itself

    def bind(self, facts: DataFacts) -> None:
        if not facts.has(Part.HELD_OUT):
            raise ValueError("eval.classification needs held-out (test) images of the trained classes, such as "
                             "MNIST's or CIFAR's test set, or data.base_queries=true.")

    def parts(self) -> set[Part]:
        return {Part.HELD_OUT}

    def metric_names(self) -> list[str]:
        return ["classification/top1"]

    def summary(self, metrics: dict[str, float]) -> list[str]:
        return [f"closed-set classification by the training classifier: top-1 "
                f"{100 * metrics['classification/top1']:.2f}% on the held-out images"]

    def evaluate(self, inputs: Inputs) -> Result:
        if inputs.classify is None:
            raise ValueError("eval.classification scores the training classifier, and this model has none: use a "
                             "loss with a classifier term (loss=softmax, l2s_mb, ie, cosface, ...).")
        split = inputs.split.of_parts({Part.HELD_OUT})
        # The mirror trick averages the two embeddings before the classifier (sec. 4.2.3 of the DM paper).
        embeddings = split.fused(self.flip, normalise=False) / (2 if self.flip else 1)
        predicted = torch.cat([inputs.classify(part).argmax(dim=1) for part in embeddings.split(4096)])
        return Result({"classification/top1": float((predicted == split.labels).double().mean())})
