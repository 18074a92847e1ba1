"""Evaluation metrics as plain functions on tensors (no Lightning, no state)."""

from __future__ import annotations

import math

import torch

from doppel.evaluation import knn


def top1_accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    if len(labels) == 0:
        return float("nan")
    return (predicted == labels).float().mean().item()


def precision_coverage_curve(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coverage, precision) at every confidence threshold, coverage ascending.

    Answers are taken in decreasing confidence; a threshold answers all queries at or above it, so equal
    confidences enter together (one point per distinct confidence).
    """
    n = len(confidence)
    order = torch.argsort(confidence, descending=True, stable=True)
    conf, hits = confidence[order], correct[order].to(torch.float64)
    answered = torch.arange(1, n + 1, dtype=torch.float64)
    precision_at = hits.cumsum(0) / answered
    # Only the last position of each run of equal confidences is a real threshold.
    step_end = torch.ones(n, dtype=torch.bool)
    step_end[:-1] = conf[1:] != conf[:-1]
    return answered[step_end] / max(n, 1), precision_at[step_end]


def coverage_at_precision(confidence: torch.Tensor, correct: torch.Tensor, precision: float) -> float:
    """Largest fraction of queries that can be answered with precision >= ``precision``: the largest
    coverage of :func:`precision_coverage_curve` whose precision reaches it (0 if none does), the metric
    of the one-shot face benchmark used by the Doppelganger paper."""
    if len(confidence) == 0:
        return float("nan")
    coverage, precision_at = precision_coverage_curve(confidence, correct)
    ok = precision_at >= precision - 1e-12
    return coverage[ok].max().item() if ok.any() else 0.0


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


def recall_at_k(embeddings: torch.Tensor, labels: torch.Tensor, k: int = 1, chunk: int | None = None) -> float:
    """Recall@K (leave-one-out retrieval): share of images whose K nearest others hold a same-label one.

    Images whose label occurs once are skipped (they cannot be retrieved). Cosine similarity on
    L2-normalised embeddings, computed in chunks so no N x N matrix is held.
    """
    return retrieval_metrics(embeddings, labels, ks=(k,), at_r=False, chunk=chunk)[f"recall@{k}"]


def retrieval_metrics(queries: torch.Tensor, query_labels: torch.Tensor, gallery: torch.Tensor | None = None,
                      gallery_labels: torch.Tensor | None = None, ks: tuple[int, ...] = (1,), at_r: bool = True,
                      chunk: int | None = None) -> dict[str, float]:
    """Retrieval by cosine similarity (inputs L2-normalised), each query against the gallery, or, without a
    gallery, against all the other queries (leave-one-out: a query's own index is masked, not its value).

    ``recall@K``: share of queries with a same-label item among their K nearest. With ``at_r`` also
    ``precision@1``, ``r_precision`` (same-label share of the R nearest, R = the query's same-label items in
    the gallery) and ``map@r`` (mean over the first R ranks of the precision at each same-label rank,
    divided by R), as Musgrave et al. define them. Queries with no same-label item are skipped. Computed in
    chunks of queries: memory is chunk x gallery, never N x N (by default chunks of 2**26 similarities,
    256 MB), on the processes and devices :mod:`doppel.evaluation.knn` spreads them over.
    """
    request = knn.Request(queries, query_labels, gallery, gallery_labels, tuple(ks), at_r, chunk)
    names = request.names()
    sums, total = dict.fromkeys(names, 0.0), 0
    for row in knn.chunk_sums(request).tolist():  # added in chunk order, wherever each chunk was computed
        for name, value in zip(names, row):
            sums[name] += value
        total += int(row[-1])
    return {name: value / total if total else float("nan") for name, value in sums.items()}


def _pairs(counts: torch.Tensor) -> torch.Tensor:
    return (counts * (counts - 1) / 2).sum()


def clustering_metrics(classes: torch.Tensor, clusters: torch.Tensor) -> dict[str, float]:
    """NMI (arithmetic-mean normalisation, scikit-learn's default) and pairwise F1 of a clustering against
    the classes: F1 of the pairs put in one cluster against the pairs of one class (the SEC paper's F1)."""
    # The contingency table kept sparse (its nonzero cells, at most N): a dense one is classes x clusters,
    # 4.7 GB at SOP's 11k classes and 4 TB at 2M.
    _, class_index = torch.unique(classes, return_inverse=True)
    _, cluster_index = torch.unique(clusters, return_inverse=True)
    clusters_count = int(cluster_index.max()) + 1
    cells, cell_count = torch.unique(class_index * clusters_count + cluster_index, return_counts=True)
    cell_class, cell_cluster = cells // clusters_count, cells % clusters_count
    cell_count = cell_count.to(torch.float64)
    class_count = torch.bincount(class_index).to(torch.float64)
    cluster_count = torch.bincount(cluster_index, minlength=clusters_count).to(torch.float64)
    n = cell_count.sum()
    joint, p_class, p_cluster = cell_count / n, class_count / n, cluster_count / n
    mutual = (joint * (joint / (p_class[cell_class] * p_cluster[cell_cluster])).log()).sum()

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p[p > 0] * p[p > 0].log()).sum()

    h_class, h_cluster = entropy(p_class), entropy(p_cluster)
    if h_class == 0 and h_cluster == 0:
        nmi = 1.0
    else:
        nmi = float(mutual / ((h_class + h_cluster) / 2)) if h_class + h_cluster > 0 else 0.0
    together, same_class, same_cluster = _pairs(cell_count), _pairs(class_count), _pairs(cluster_count)
    precision = together / same_cluster if same_cluster > 0 else torch.tensor(0.0, dtype=torch.float64)
    recall = together / same_class if same_class > 0 else torch.tensor(0.0, dtype=torch.float64)
    f1 = float(2 * precision * recall / (precision + recall)) if precision + recall > 0 else 0.0
    return {"nmi": max(0.0, min(1.0, nmi)), "f1": f1}


def kmeans(points: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 300, tol: float = 1e-4,
           chunk: int = 8192) -> torch.Tensor:
    """Cluster index of every point: greedy k-means++ seeding from ``generator``, then Lloyd's iterations until
    no assignment changes or the centres move less than ``tol`` times the data's mean per-feature variance
    (scikit-learn's rule). Distances in float32 in chunks of points (no N x k x D tensor); centres are
    averaged in float64."""
    if not 1 <= k <= len(points):
        raise ValueError(f"k-means needs 1 <= k <= {len(points)} points, got k={k}.")
    points = points.float()
    squared = points.square().sum(1)
    bound = tol * float(points.double().var(dim=0, unbiased=False).mean())

    def nearest(centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        best, index = [], []
        centres_squared = centres.square().sum(1)
        for start in range(0, len(points), chunk):
            part = points[start:start + chunk]
            distance = squared[start:start + chunk, None] - 2 * part @ centres.T + centres_squared[None]
            d, i = distance.clamp_min(0).min(dim=1)
            best.append(d)
            index.append(i)
        return torch.cat(best), torch.cat(index)

    first = int(torch.randint(len(points), (1,), generator=generator))
    chosen = [first]
    distance, _ = nearest(points[first:first + 1])
    trials = 2 + int(math.log(k))  # greedy k-means++ (scikit-learn's): the best of a few candidates per centre
    for _ in range(1, k):
        total = distance.double().sum()
        weights = distance.double() / total if total > 0 else torch.full_like(distance, 1 / len(distance)).double()
        candidates = torch.multinomial(weights, trials, replacement=True, generator=generator)
        picked = points[candidates]
        to_candidates = (squared[None] - 2 * picked @ points.T + picked.square().sum(1)[:, None]).clamp_min(0)
        potentials = torch.minimum(distance[None], to_candidates).double().sum(1)
        best = int(torch.argmin(potentials))
        chosen.append(int(candidates[best]))
        distance = torch.minimum(distance, to_candidates[best])
    centres = points[chosen].double()
    assignment = nearest(centres.float())[1]
    for _ in range(iterations):
        sums = torch.zeros_like(centres).index_add_(0, assignment, points.double())
        sizes = torch.bincount(assignment, minlength=k).to(centres.dtype)
        moved = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1)[:, None], centres)
        shift = float((moved - centres).square().sum())
        centres = moved
        updated = nearest(centres.float())[1]
        if torch.equal(updated, assignment) or shift <= bound:
            assignment = updated
            break
        assignment = updated
    return assignment
