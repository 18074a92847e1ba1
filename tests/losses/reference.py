"""Naive references written from the papers' equations: loops over examples, pairs and triplets.

Slow on purpose; each mirrors one formula so that a vectorised term can be checked against it.
"""

from __future__ import annotations

import math

import torch


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def cross_entropy(logits: list[torch.Tensor], target: int) -> torch.Tensor:
    return torch.logsumexp(torch.stack(logits), 0) - logits[target]


# -- prototype terms ---------------------------------------------------------------------------
def softmax(x, labels, weight, bias):
    losses = [cross_entropy([weight[c] @ x[i] + bias[c] for c in range(len(weight))], labels[i])
              for i in range(len(x))]
    return torch.stack(losses).mean()


def margin_softmax(x, labels, weight, psi, scale=None, normalize_weights=True):
    """Softmax over magnitude_j * cos(theta_j), target magnitude_y * psi(cos theta_y)."""
    losses = []
    for i in range(len(x)):
        logits = []
        for c in range(len(weight)):
            cos = unit(x[i]) @ unit(weight[c])
            magnitude = x[i].norm() if scale is None else scale
            if not normalize_weights:
                magnitude = magnitude * weight[c].norm()
            logits.append(magnitude * (psi(cos) if c == labels[i] else cos))
        losses.append(cross_entropy(logits, labels[i]))
    return torch.stack(losses).mean()


def arcface_psi(margin):
    def psi(cos):
        theta = torch.acos(cos)
        if theta + margin <= math.pi:
            return torch.cos(theta + margin)
        return cos - margin * math.sin(margin)
    return psi


def multiplicative_psi(margin, lam=0.0):
    """Eq. (3) of the IE paper with psi = (-1)^k cos(m theta) - 2k, annealed by lambda."""
    def psi(cos):
        theta = torch.acos(cos)
        k = min(int(theta.item() * margin / math.pi), margin - 1)
        value = (-1) ** k * torch.cos(margin * theta) - 2 * k
        return (lam * cos + value) / (1 + lam)
    return psi


def center(x, labels, centres):
    return torch.stack([(x[i] - centres[labels[i]]).pow(2).sum() for i in range(len(x))]).sum() / (2 * len(x))


def ie(x, labels, centres, alpha, q_fraction, variance):
    """Eq. (6) of the IE paper; ``variance`` a number, or "batch" for eq. (5)'s detached estimate."""
    n = len(x)
    d = [[(x[i] - centres[c]).pow(2).sum() for c in range(len(centres))] for i in range(n)]
    if variance == "batch":
        variance = (sum(d[i][labels[i]] for i in range(n)) / (n - 1)).detach()
    present = sorted(set(labels.tolist()))
    q = max(1, math.ceil(q_fraction * (len(present) - 1)))
    losses = []
    for i in range(n):
        others = sorted((d[i][c] for c in present if c != labels[i]), key=lambda t: t.item())[:q]
        denominator = sum(torch.exp(-t / (2 * variance)) for t in others)
        numerator = torch.exp(-d[i][labels[i]] / (2 * variance) - alpha)
        losses.append(torch.relu(-torch.log(numerator / denominator)))
    return torch.stack(losses).mean()


# -- exemplar terms ----------------------------------------------------------------------------
def cos_matrix(x):
    z = [unit(v) for v in x]
    return [[z[i] @ z[j] for j in range(len(x))] for i in range(len(x))]


def sq_dist_matrix(x):
    z = [unit(v) for v in x]
    return [[(z[i] - z[j]).pow(2).sum() for j in range(len(x))] for i in range(len(x))]


def pairs(labels, same):
    n = len(labels)
    return [(i, j) for i in range(n) for j in range(n) if i != j and (labels[i] == labels[j]) == same]


def contrastive(x, labels, pos_margin, neg_margin, power, nonzero=False):
    d = [[t.clamp_min(1e-12).sqrt() for t in row] for row in sq_dist_matrix(x)]
    total = 0.0
    for same, f in ((True, lambda t: torch.relu(t - pos_margin)), (False, lambda t: torch.relu(neg_margin - t))):
        values = [f(d[i][j]) ** power for i, j in pairs(labels, same)]
        if nonzero:
            values = [v for v in values if v > 0]
        if values:
            total = total + torch.stack(values).mean()
    return total


def triplets(labels):
    n = len(labels)
    return [(a, p, q) for a in range(n) for p in range(n) for q in range(n)
            if a != p and labels[a] == labels[p] and labels[q] != labels[a]]


def triplet(x, labels, margin, nonzero=False):
    d = sq_dist_matrix(x)
    values = [torch.relu(d[a][p] - d[a][n] + margin) for a, p, n in triplets(labels)]
    if nonzero:
        values = [v for v in values if v > 0]
    return torch.stack(values).mean()


def semihard_facenet(x, labels, margin):
    d = sq_dist_matrix(x)
    losses = []
    for a, p in pairs(labels, True):
        negatives = [d[a][n] for n in range(len(x)) if labels[n] != labels[a]]
        farther = [t for t in negatives if t > d[a][p]]
        chosen = min(farther, key=lambda t: t.item()) if farther else max(negatives, key=lambda t: t.item())
        losses.append(torch.relu(d[a][p] - chosen + margin))
    return torch.stack(losses).mean()


def semihard_all(x, labels, margin):
    d = sq_dist_matrix(x)
    values = [d[a][p] - d[a][n] + margin for a, p, n in triplets(labels) if d[a][p] < d[a][n] <= d[a][p] + margin]
    return torch.stack(values).mean()


def npair(x, labels, scale):
    s = cos_matrix(x)
    losses = []
    for a, p in pairs(labels, True):
        terms = [torch.exp(scale * (s[a][n] - s[a][p])) for n in range(len(x)) if labels[n] != labels[a]]
        losses.append(torch.log(1 + sum(terms)))
    return torch.stack(losses).mean()


def ntxent_views(x, temperature):
    """SimCLR's form: -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t), j the other view of i."""
    s = cos_matrix(x)
    n = len(x)
    half = n // 2
    losses = []
    for i in range(n):
        j = (i + half) % n
        denominator = sum(torch.exp(s[i][k] / temperature) for k in range(n) if k != i)
        losses.append(-torch.log(torch.exp(s[i][j] / temperature) / denominator))
    return torch.stack(losses).mean()


def multi_similarity(x, labels, epsilon, base, alpha, beta):
    s = cos_matrix(x)
    n = len(x)
    losses = []
    for a in range(n):
        pos = [s[a][p] for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [s[a][q] for q in range(n) if labels[q] != labels[a]]
        loss = torch.zeros((), dtype=x.dtype)
        if pos and neg:
            kept_pos = [t for t in pos if t - epsilon < max(neg)]
            kept_neg = [t for t in neg if t + epsilon > min(pos)]
            zero = torch.zeros((), dtype=x.dtype)
            loss = loss + torch.log(1 + sum((torch.exp(-alpha * (t - base)) for t in kept_pos), zero)) / alpha
            loss = loss + torch.log(1 + sum((torch.exp(beta * (t - base)) for t in kept_neg), zero)) / beta
        losses.append(loss)
    return torch.stack(losses).mean()


# -- regularisers ------------------------------------------------------------------------------
def sec(x, mu=None):
    norms = [v.norm() for v in x]
    if mu is None:
        mu = (sum(norms) / len(norms)).detach()
    return torch.stack([(t - mu) ** 2 for t in norms]).mean()
