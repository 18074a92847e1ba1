"""Exemplar (pair-based) loss terms: every pair of the batch, in O(B^2) memory.

Lifted Structured and the cosine Margin loss of the Doppelganger paper (sec. 4.2.4); contrastive, triplet,
semi-hard triplet, normalised N-pair, multi-similarity and NT-Xent of the SEC paper (sec. 4.1). No term
forms a B x B x B tensor: triplet sums use sorted negatives and prefix sums instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from doppel.host_syncs import to_device


def same_label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) pair masks [B, B]; the diagonal is in neither."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def masked_logsumexp(values: torch.Tensor, mask: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """logsumexp over the masked entries; -inf (with zero gradient, not NaN) where a row has none."""
    has_any = mask.any(dim)
    safe = values.masked_fill(~mask, float("-inf")).masked_fill(~has_any.unsqueeze(dim), 0.0)
    return torch.logsumexp(safe, dim).masked_fill(~has_any, float("-inf"))


def cosine_similarities(embeddings: torch.Tensor) -> torch.Tensor:
    x = F.normalize(embeddings, dim=1)
    return x @ x.T


def squared_normalized_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """||f_i/|f_i| - f_j/|f_j|||^2 = 2 - 2 cos(theta_ij), the triplet losses' distance (SEC paper sec. 3.1)."""
    return (2 - 2 * cosine_similarities(embeddings)).clamp_min(0)


def positive_slots(positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's positive columns, left-aligned: (indices [B, P], valid [B, P]), P the largest count."""
    width = max(int(positive.sum(1).max()), 1) if len(positive) else 1
    order = positive.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :width]
    return order, positive.gather(1, order)


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
        lse = masked_logsumexp(self.margin - distance, negative)
        pair = torch.triu(positive, diagonal=1)
        if not pair.any() or not negative.any():
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
        anchor, partner, y, drawn = self._draw(similarity, labels)
        return anchor[drawn], partner[drawn], y[drawn]

    def _draw(self, similarity: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A positive and a negative candidate for every anchor, fixed in number (the step never waits for
        the device), with ``drawn``: whether the anchor had any violating pair of that kind."""
        with torch.no_grad():
            beta = self.beta.detach()
            positive, negative = same_label_masks(labels)
            v_pos = (beta + self.alpha - similarity).clamp_min(0) * positive
            v_neg = (similarity - (beta - self.alpha)).clamp_min(0) * negative
            anchor = torch.arange(len(labels), device=labels.device)
            partners, drawn = zip(*(_draw_proportional(weights, self.generator) for weights in (v_pos, v_neg)))
            signs = torch.ones(2, len(labels), dtype=similarity.dtype, device=similarity.device)
            signs[1] = -1.0
        return anchor.repeat(2), torch.cat(partners), signs.flatten(), torch.cat(drawn)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = F.normalize(embeddings, dim=1)
        similarity = x @ x.T
        anchor, partner, y, drawn = self._draw(similarity, labels)
        losses = F.relu(self.alpha - y * (similarity[anchor, partner] - self.beta))
        return (losses * drawn).sum() / drawn.sum().clamp_min(1)  # the mean over drawn pairs; none: 0

    def scalars(self) -> dict[str, torch.Tensor]:
        return {"beta": self.beta}


def _draw_proportional(weights: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For every row, a column drawn with probability weight / row total, and whether the row has any
    weight (where it has none, the column means nothing)."""
    u = to_device(torch.rand(len(weights), generator=generator, dtype=torch.float64), weights.device)
    cumulative = weights.to(torch.float64).cumsum(1)
    # First column whose cumulative weight exceeds u * total: that column has positive weight.
    columns = torch.searchsorted(cumulative, (u * cumulative[:, -1])[:, None], right=True).squeeze(1)
    return columns.clamp_max(weights.shape[1] - 1), weights.sum(1) > 0


class ContrastiveLoss(nn.Module):
    """Contrastive loss (Hadsell et al. 2006) on the normalised Euclidean distance ``d``.

    ``mean_pos relu(d - pos_margin)^p + mean_neg relu(neg_margin - d)^p``; ``power=2`` is Hadsell's
    squared form, ``power=1`` the linear one. ``reduction="mean_nonzero"`` averages each sum over its
    non-zero pairs only. Only positive pairs and negatives inside the margin (``d < neg_margin``, i.e.
    ``cos > 1 - neg_margin^2 / 2``) are gathered: the other B^2 entries contribute exactly 0.
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 1.0, power: int = 2,
                 reduction: str = "mean") -> None:
        super().__init__()
        self.pos_margin, self.neg_margin, self.power = pos_margin, neg_margin, power
        self.reduction = _check_reduction(reduction)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        similarity = cosine_similarities(embeddings)
        positive, negative = same_label_masks(labels)
        if self.neg_margin > 0:
            inside = negative & (similarity.detach() > 1 - self.neg_margin**2 / 2)
        else:
            inside = torch.zeros_like(negative)
        pull = F.relu(self._distance(similarity[positive]) - self.pos_margin).pow(self.power)
        push = F.relu(self.neg_margin - self._distance(similarity[inside])).pow(self.power)
        if self.reduction == "mean":
            counts = positive.sum(), negative.sum()
        else:
            counts = (pull > 0).sum(), (push > 0).sum()
        return pull.sum() / counts[0].clamp_min(1) + push.sum() / counts[1].clamp_min(1)

    @staticmethod
    def _distance(similarity: torch.Tensor) -> torch.Tensor:
        # Clamped before the root: identical embeddings must not give an infinite gradient.
        return (2 - 2 * similarity).clamp_min(1e-12).sqrt()


class TripletLoss(nn.Module):
    """Eq. (2) of the SEC paper over all triplets of the batch: ``(D_ap - D_an + m)_+`` with ``D`` the
    squared normalised Euclidean distance, averaged over all valid triplets (``reduction="mean"``) or
    over the violating ones (``"mean_nonzero"``).

    For an anchor's positive, ``sum_n (t - D_an)_+ = count(D_an < t) * t - (sum of those D_an)`` with
    ``t = D_ap + m``: one sort of each row's negatives and a prefix sum replace the B^3 triplet tensor.
    """

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        self.margin = margin
        self.reduction = _check_reduction(reduction)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        distance = squared_normalized_distances(embeddings)
        positive, negative = same_label_masks(labels)
        slots, valid = positive_slots(positive)
        negatives = _SortedNegatives(distance, negative)
        threshold = distance.gather(1, slots) + self.margin
        count = negatives.count_below(threshold) * valid
        total = (count * threshold - negatives.sum_of_first(count)).sum()
        if self.reduction == "mean":
            denominator = (valid.sum(1) * negatives.count).sum()
        else:
            denominator = count.sum()
        return total / denominator.clamp_min(1)


class SemiHardTripletLoss(nn.Module):
    """Semi-hard triplet loss (Schroff et al., FaceNet), margin 0.2, on the distance of :class:`TripletLoss`.

    ``rule="facenet"``: every positive pair (a, p) takes one negative, the closest one farther than
    ``p`` (``D_an > D_ap``), or the farthest negative when none is; the loss is
    ``mean (D_ap - D_an + m)_+`` over positive pairs (the rule of FaceNet's TensorFlow loss).
    ``rule="all"``: every triplet with ``D_ap < D_an <= D_ap + m``, averaged (the rule of
    pytorch-metric-learning's semi-hard miner).
    """

    RULES = ("facenet", "all")

    def __init__(self, margin: float = 0.2, rule: str = "facenet") -> None:
        super().__init__()
        if rule not in self.RULES:
            raise ValueError(f"SemiHardTripletLoss rule must be one of {self.RULES}, got {rule!r}.")
        self.margin, self.rule = margin, rule

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        distance = squared_normalized_distances(embeddings)
        positive, negative = same_label_masks(labels)
        slots, valid = positive_slots(positive)
        valid = valid & negative.any(1, keepdim=True)
        if not valid.any():
            return distance.sum() * 0.0
        negatives = _SortedNegatives(distance, negative)
        d_ap = distance.gather(1, slots)
        closer = negatives.count_below(d_ap, inclusive=True)  # negatives with D_an <= D_ap
        if self.rule == "facenet":
            farther_exists = closer < negatives.count[:, None]
            pick = torch.where(farther_exists, closer, negatives.count[:, None] - 1).clamp_min(0)
            d_an = negatives.values.gather(1, pick)
            losses = F.relu(d_ap - d_an + self.margin)[valid]
            return losses.mean()
        threshold = d_ap + self.margin
        within = (negatives.count_below(threshold, inclusive=True) - closer) * valid
        d_an_sum = negatives.sum_of_first(closer + within) - negatives.sum_of_first(closer)
        total = (within * threshold - d_an_sum).sum()
        return total / within.sum().clamp_min(1)


class _SortedNegatives:
    """Each row's negative distances sorted ascending (non-negatives as +inf at the end), with prefix sums."""

    def __init__(self, distance: torch.Tensor, negative: torch.Tensor) -> None:
        self.values = distance.masked_fill(~negative, float("inf")).sort(dim=1).values
        self.count = negative.sum(1)
        finite = self.values.masked_fill(~torch.isfinite(self.values), 0.0)
        self.prefix = F.pad(finite.cumsum(1), (1, 0))

    def count_below(self, thresholds: torch.Tensor, inclusive: bool = False) -> torch.Tensor:
        """Per row and threshold, how many negatives are < (or <=) it."""
        found = torch.searchsorted(self.values, thresholds.detach().contiguous(), right=inclusive)
        return torch.minimum(found, self.count[:, None])

    def sum_of_first(self, counts: torch.Tensor) -> torch.Tensor:
        return self.prefix.gather(1, counts)


class NormalizedNPairLoss(nn.Module):
    """Normalised N-pair / tuple loss, eq. (3) of the SEC paper, scale s = 25.

    For every positive pair (a, p): ``log(1 + sum_{n in N(a)} exp(s (S_an - S_ap)))`` with ``S`` the
    cosine similarity, averaged over positive pairs. As ``softplus(logsumexp_n(s S_an) - s S_ap)``
    it needs one B x B matrix.
    """

    def __init__(self, scale: float = 25.0) -> None:
        super().__init__()
        self.scale = scale

    def pair_losses(self, similarity: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        logits = self.scale * similarity
        negatives = masked_logsumexp(logits, negative)
        return F.softplus(negatives[:, None] - logits)[positive]

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        positive, negative = same_label_masks(labels)
        if not positive.any():
            return embeddings.sum() * 0.0
        return self.pair_losses(cosine_similarities(embeddings), positive, negative).mean()


class NTXentLoss(NormalizedNPairLoss):
    """NT-Xent of SimCLR (Chen et al.), temperature 0.5: eq. (3)'s form with ``s = 1 / temperature``.

    ``positives="views"``: the batch is two views stacked, ``[view 1 of B images; view 2]``
    (``loss.views=2``); row ``i`` and row ``i + B`` are the only positives, every other row is a
    negative. ``positives="labels"``: same-label rows are positives (the supervised form).
    """

    def __init__(self, temperature: float = 0.5, positives: str = "views") -> None:
        super().__init__(scale=1.0 / temperature)
        if positives not in ("views", "labels"):
            raise ValueError(f"NTXentLoss positives must be 'views' or 'labels', got {positives!r}.")
        self.positives = positives

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.positives == "labels":
            return super().forward(embeddings, labels)
        half = len(labels) // 2
        if len(labels) % 2 or not torch.equal(labels[:half], labels[half:]):
            raise ValueError("NTXentLoss with positives='views' needs two stacked views of each image "
                             "(set loss.views=2), or use positives='labels'.")
        views = torch.arange(half, device=labels.device).repeat(2)
        return super().forward(embeddings, views)


class MultiSimilarityLoss(nn.Module):
    """Multi-similarity loss (Wang et al. 2019) with its pair mining; SEC paper values
    ``epsilon = 0.1, lambda = 0.5, alpha = 2, beta = 40``.

    Mining keeps a positive if ``S_ap - eps < max_n S_an`` and a negative if ``S_an + eps > min_p S_ap``;
    the loss is ``mean_a [1/alpha log(1 + sum_p exp(-alpha (S_ap - lambda)))
    + 1/beta log(1 + sum_n exp(beta (S_an - lambda)))]`` over kept pairs, averaged over all anchors.
    """

    def __init__(self, epsilon: float = 0.1, base: float = 0.5, alpha: float = 2.0, beta: float = 40.0) -> None:
        super().__init__()
        self.epsilon, self.base, self.alpha, self.beta = epsilon, base, alpha, beta

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        similarity = cosine_similarities(embeddings)
        positive, negative = same_label_masks(labels)
        with torch.no_grad():
            hardest_negative = similarity.masked_fill(~negative, float("-inf")).max(1).values
            hardest_positive = similarity.masked_fill(~positive, float("inf")).min(1).values
            keep_pos = positive & (similarity - self.epsilon < hardest_negative[:, None])
            keep_neg = negative & (similarity + self.epsilon > hardest_positive[:, None])
        pull = F.softplus(masked_logsumexp(-self.alpha * (similarity - self.base), keep_pos)) / self.alpha
        push = F.softplus(masked_logsumexp(self.beta * (similarity - self.base), keep_neg)) / self.beta
        return (pull + push).mean()


def _check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "mean_nonzero"):
        raise ValueError(f"reduction must be 'mean' or 'mean_nonzero', got {reduction!r}.")
    return reduction
