"""The linear probe minimises scikit-learn's logistic-regression objective."""

import numpy as np
import pytest
import torch

from doppel.data.dataset import Part
from doppel.evaluation.linear_probe import LinearProbeProtocol
from doppel.evaluation.protocol import DataFacts, Embedded, Inputs


def toy(seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([3, 5, 9]).repeat_interleave(60)  # class ids need not be 0..C-1
    features = torch.randn(3, 6, generator=g)[torch.tensor([0, 1, 2]).repeat_interleave(60)] * 0.8
    features = features + torch.randn(180, 6, generator=g) + torch.tensor([5.0, 0, 0, 0, 0, -3.0])
    parts = torch.tensor(([Part.TRAIN] * 40 + [Part.HELD_OUT] * 20) * 3)
    return features, labels, parts


def test_the_probe_is_scikit_learns_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    features, labels, parts = toy()
    train = parts == Part.TRAIN
    probe = LinearProbeProtocol(iterations=500, weight_decay=0.01)
    classes, layer, mean, scale = probe.fit(features[train], labels[train])
    x = features[train].numpy().astype(np.float64)
    scaler = StandardScaler().fit(x)
    # standardised with the n - 1 deviation, as torch.std; scikit-learn minimises C * sum(CE) + ||W||^2 / 2,
    # which is n * C * (mean CE + ||W||^2 / (2 n C)): C = 1 / (n * wd)
    reference = LogisticRegression(C=1 / (len(x) * 0.01), tol=1e-10, max_iter=5000)
    reference.fit(scaler.transform(x) * np.sqrt((len(x) - 1) / len(x)), labels[train].numpy())
    held_out = features[~train].numpy().astype(np.float64)
    ours = torch.softmax(layer(((features[~train] - mean) / scale).double()), 1).detach().numpy()
    theirs = reference.predict_proba(scaler.transform(held_out) * np.sqrt((len(x) - 1) / len(x)))
    assert classes.tolist() == reference.classes_.tolist() == [3, 5, 9]
    assert np.abs(ours - theirs).max() < 1e-4


def test_top1_is_that_of_the_probe_on_the_held_out_images():
    features, labels, parts = toy(1)
    probe = LinearProbeProtocol(iterations=200, weight_decay=0.01)
    probe.bind(DataFacts(parts=parts, references_given=False, benchmark=None, folder=None, locate=None))
    metrics = probe.evaluate(Inputs(split=Embedded(features, None, labels, parts))).metrics
    train = parts == Part.TRAIN
    classes, layer, mean, scale = probe.fit(features[train], labels[train])
    predicted = classes[layer(((features[~train] - mean) / scale).double()).argmax(1)]
    assert metrics == {"linear_probe/top1": pytest.approx((predicted == labels[~train]).float().mean().item())}
    assert 0.5 < metrics["linear_probe/top1"] < 1.0  # a toy that is neither hopeless nor trivial
    with pytest.raises(ValueError, match="held-out"):
        probe.bind(DataFacts(parts=parts[train], references_given=False, benchmark=None, folder=None, locate=None))


def test_the_final_table_says_what_was_measured():
    from doppel.evaluation.classification import ClassificationProtocol
    from doppel.evaluation.linear_probe import LinearProbeProtocol

    assert LinearProbeProtocol(iterations=50).summary({"linear_probe/top1": 0.8125}) == [
        "linear probe (softmax regression on the frozen embeddings of the training images, 50 L-BFGS iterations): "
        "top-1 81.25% on the held-out images"]
    assert ClassificationProtocol().summary({"classification/top1": 0.5}) == [
        "closed-set classification by the training classifier: top-1 50.00% on the held-out images"]
