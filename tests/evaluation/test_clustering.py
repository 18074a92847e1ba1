"""NMI against scikit-learn, pairwise F1 against a loop over all pairs, k-means on separable data."""

import itertools

import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from doppel.evaluation.metrics import clustering_metrics, kmeans


def pair_f1(classes, clusters):
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(classes)), 2):
        same_class, same_cluster = classes[i] == classes[j], clusters[i] == clusters[j]
        tp += same_class and same_cluster
        fp += same_cluster and not same_class
        fn += same_class and not same_cluster
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nmi_matches_scikit_learn_and_f1_a_loop_over_pairs(seed):
    generator = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, 7, (90,), generator=generator)
    clusters = torch.where(torch.rand(90, generator=generator) < 0.6, classes * 3 + 10,
                           torch.randint(0, 9, (90,), generator=generator))  # label ids need not match
    ours = clustering_metrics(classes, clusters)
    assert ours["nmi"] == pytest.approx(normalized_mutual_info_score(classes.numpy(), clusters.numpy()), abs=1e-12)
    assert ours["f1"] == pytest.approx(pair_f1(classes.tolist(), clusters.tolist()), abs=1e-12)
    assert 0.2 < ours["nmi"] < 0.95


def test_a_clustering_of_a_million_classes_needs_no_dense_table():
    """300k images in 150k classes and 150k clusters: a dense contingency table would be 180 GB; the sparse
    one gives scikit-learn's NMI (its table is sparse too) and the pair counts' F1."""
    generator = torch.Generator().manual_seed(0)
    classes = torch.randint(0, 150_000, (300_000,), generator=generator)
    clusters = torch.where(torch.rand(300_000, generator=generator) < 0.7, classes,
                           torch.randint(0, 150_000, (300_000,), generator=generator))
    ours = clustering_metrics(classes, clusters)
    assert ours["nmi"] == pytest.approx(normalized_mutual_info_score(classes.numpy(), clusters.numpy()), abs=1e-10)
    from sklearn.metrics.cluster import pair_confusion_matrix

    (_, fp), (fn, tp) = pair_confusion_matrix(classes.numpy(), clusters.numpy()) / 2  # ordered pairs counted twice
    assert ours["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)


def test_kmeans_recovers_separated_clusters_whatever_their_order():
    generator = torch.Generator().manual_seed(3)
    centres = torch.randn(6, 4, generator=generator) * 20
    classes = torch.randint(0, 6, (300,), generator=generator)
    points = centres[classes] + torch.randn(300, 4, generator=generator)
    clusters = kmeans(points, 6, torch.Generator().manual_seed(0), chunk=37)
    metrics = clustering_metrics(classes, clusters)
    assert metrics["nmi"] == pytest.approx(1.0, abs=1e-12) and metrics["f1"] == pytest.approx(1.0, abs=1e-12)
    assert torch.equal(clusters, kmeans(points, 6, torch.Generator().manual_seed(0)))  # chunks change nothing
    with pytest.raises(ValueError, match="1 <= k <= 300"):
        kmeans(points, 301, generator)
