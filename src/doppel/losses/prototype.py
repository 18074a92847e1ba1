"""Prototype (classifier) loss terms. Each owns its class weights and keeps its last logits.

The doppelganger miner reads ``last_logits`` after every training step (sec. 3.2 of the
Doppelganger paper: the scores the prototype loss already computed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeTerm(nn.Module):
    """A classifier over ``num_classes`` prototypes; ``last_logits`` holds the latest batch's scores."""

    def __init__(self) -> None:
        super().__init__()
        self.last_logits: torch.Tensor | None = None

    def check_labels(self, labels: torch.Tensor) -> None:
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}) for the {type(self).__name__} classifier, got "
                f"[{int(labels.min())}, {int(labels.max())}]: the data's class count and the loss disagree."
            )


class L2Softmax(PrototypeTerm):
    """L2-constrained softmax (Ranjan et al.): softmax cross-entropy on ``alpha * f / ||f||``.

    The Doppelganger paper (sec. 4.2.5) trains ``alpha`` from an initial value of 16. The classifier is
    an ordinary fully connected layer (weights not normalised, with bias), as in Ranjan et al.
    """

    def __init__(self, embedding_dim: int, num_classes: int, scale: float = 16.0,
                 trainable_scale: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.classifier = nn.Linear(embedding_dim, num_classes, bias=bias)
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=trainable_scale)

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.scale * F.normalize(embeddings, dim=1))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.check_labels(labels)
        logits = self.logits(embeddings)
        self.last_logits = logits.detach()
        return F.cross_entropy(logits, labels)

    def scalars(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale}
