"""Exemplar (pair-based) loss terms of the Doppelganger paper (sec. 4.2.4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def same_label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) pair masks [B, B]; the diagonal is in neither."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


class LiftedStructured(nn.Module):
    """Lifted Structured Feature Embedding (Song et al. 2016, eq. 4), on ``scale * f / ||f||``.

    For each positive pair (i, j), i < j:
    J_ij = log(sum_{k in N(i)} exp(m - D_ik) + sum_{l in N(j)} exp(m - D_jl)) + D_ij,
    loss = sum max(0, J_ij)^2 / (2 |P|). D is the Euclidean distance; the Doppelganger paper trains
    ``scale`` (initial 12) as L2-Softmax does. Memory is O(B^2): no B x B x B tensor is formed.
    """

    def __init__(self, margin: float = 1.0, scale: float = 12.0, trainable_scale: bool = True) -> None:
        super().__init__()
        self.margin = margin
        self.scale = nn.Parameter(torch.tensor(float(scale)), requires_grad=trainable_scale)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.scale * F.normalize(embeddings, dim=1)
        norms = x.pow(2).sum(1)
        squared = norms[:, None] + norms[None, :] - 2 * x @ x.T
        # Clamped before the root: identical embeddings must not give an infinite gradient.
        distance = squared.clamp_min(1e-12).sqrt()
        positive, negative = same_label_masks(labels)
        neg_terms = (self.margin - distance).masked_fill(~negative, float("-inf"))
        lse = torch.logsumexp(neg_terms, dim=1)
        pair = torch.triu(positive, diagonal=1)
        if not pair.any():
            return distance.sum() * 0.0
        i, j = pair.nonzero(as_tuple=True)
        j_ij = torch.logaddexp(lse[i], lse[j]) + distance[i, j]
        return F.relu(j_ij).pow(2).sum() / (2 * len(i))

    def scalars(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale}


class CosineMarginLoss(nn.Module):
    """Eq. (2)-(5) of the Doppelganger paper: margin loss on cosine similarity with its sampling.

    loss(i, j) = (alpha - y_ij (S_ij - beta))_+ with beta trainable. For each anchor one positive and
    one negative (or none) are drawn with probability proportional to their margin violation
    v_pos = (beta + alpha - S)_+ (eq. 3) and v_neg = (S - (beta - alpha))_+ (eq. 4), eq. (5). The loss is
    the mean over the drawn pairs. Draws use the term's own generator (seeded), not the global RNG.
    """

    def __init__(self, alpha: float = 0.1, beta: float = 0.5, trainable_beta: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.alpha = alpha
        self.beta = nn.Parameter(torch.tensor(float(beta)), requires_grad=trainable_beta)
        self.generator = torch.Generator().manual_seed(seed)

    def sample_pairs(self, similarity: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Indices (anchor, partner, y) of the drawn pairs, y = +1 positive / -1 negative."""
        with torch.no_grad():
            beta = self.beta.detach()
            positive, negative = same_label_masks(labels)
            v_pos = (beta + self.alpha - similarity).clamp_min(0) * positive
            v_neg = (similarity - (beta - self.alpha)).clamp_min(0) * negative
            anchors, partners, signs = [], [], []
            for weights, sign in ((v_pos, 1.0), (v_neg, -1.0)):
                anchor, partner = _draw_proportional(weights, self.generator)
                anchors.append(anchor)
                partners.append(partner)
                signs.append(torch.full_like(anchor, sign, dtype=similarity.dtype))
        return torch.cat(anchors), torch.cat(partners), torch.cat(signs)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = F.normalize(embeddings, dim=1)
        similarity = x @ x.T
        anchor, partner, y = self.sample_pairs(similarity, labels)
        if len(anchor) == 0:
            return similarity.sum() * 0.0 + self.beta * 0.0
        return F.relu(self.alpha - y * (similarity[anchor, partner] - self.beta)).mean()

    def scalars(self) -> dict[str, torch.Tensor]:
        return {"beta": self.beta}


def _draw_proportional(weights: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row with positive total weight, one column drawn with probability weight / total."""
    total = weights.sum(1)
    rows = (total > 0).nonzero(as_tuple=True)[0]
    if len(rows) == 0:
        return rows, rows
    u = torch.rand(len(rows), generator=generator, dtype=torch.float64).to(weights.device)
    cumulative = weights[rows].to(torch.float64).cumsum(1)
    target = u * cumulative[:, -1]
    # First column whose cumulative weight exceeds u * total: that column has positive weight.
    columns = torch.searchsorted(cumulative, target[:, None], right=True).squeeze(1)
    return rows, columns.clamp_max(weights.shape[1] - 1)
