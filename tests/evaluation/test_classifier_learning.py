"""Stage-2 classifier learning (DM sec. 4.2.8): its batches, its start (the prototypes), and its training
against a hand-written loop of the update rule."""

import math

import pytest
import torch
import torch.nn.functional as F

from doppel.data.dataset import Part
from doppel.evaluation.classifier_learning import ClassifierLearningProtocol, cosine_lr, draw_batches
from doppel.evaluation.protocol import DataFacts, Embedded, Inputs
from doppel.evaluation.prototype import prototype_metrics


def toy_split(seed: int = 0):
    """4 base classes (5 train images + 1 held out each), 3 novel (1 reference + 3 queries each), 8-d."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(7, 8, generator=g)
    labels, parts = [], []
    for c in range(4):
        labels += [c] * 6
        parts += [Part.TRAIN] * 5 + [Part.HELD_OUT]
    for c in range(4, 7):
        labels += [c] * 4
        parts += [Part.REFERENCE] + [Part.QUERY] * 3
    labels = torch.tensor(labels)
    embeddings = centres[labels] + 0.9 * torch.randn(len(labels), 8, generator=g)
    return Embedded(embeddings, None, labels, torch.tensor([int(p) for p in parts]))


def bound(protocol, split):
    protocol.bind(DataFacts(parts=split.parts, references_given=False, benchmark=None, folder=None,
                            locate=lambda path, key: path))
    return protocol


def test_each_batch_takes_one_image_of_each_of_distinct_classes():
    labels = torch.tensor([2, 0, 0, 1, 2, 2, 1])
    seen = set()
    for batch in draw_batches(labels, 3, 3, 50, torch.Generator().manual_seed(0)):
        assert sorted(labels[batch].tolist()) == [0, 1, 2]
        seen |= set(batch.tolist())
    assert seen == set(range(7))  # every image of every class is drawn at some point
    for batch in draw_batches(labels, 3, 2, 20, torch.Generator().manual_seed(1)):
        assert len(set(labels[batch].tolist())) == 2


def test_the_schedule_runs_from_lr_to_lr_end():
    assert cosine_lr(0, 500, 1e-3, 1e-4) == pytest.approx(1e-3)
    assert cosine_lr(499, 500, 1e-3, 1e-4) == pytest.approx(1e-4)
    assert cosine_lr(1, 3, 1e-3, 1e-4) == pytest.approx(5.5e-4)


def test_without_training_it_answers_as_the_prototypes_do():
    split = toy_split()
    protocol = bound(ClassifierLearningProtocol(iterations=0, flip=False), split)
    metrics = protocol.evaluate(Inputs(split=split)).metrics
    reference = prototype_metrics(split.fused(False), split.labels, split.parts)
    for name in ("base", "novel"):
        assert metrics[f"classifier_learning/{name}/top1"] == reference[f"{name}/top1"]
    assert sorted(metrics) == sorted(protocol.metric_names())


def test_training_follows_the_l2_softmax_sgd_update_written_out():
    split = toy_split(1)
    protocol = bound(ClassifierLearningProtocol(iterations=7, batch_size=3, lr=0.5, lr_end=0.05, flip=False,
                                                seed=3), split)
    embeddings = split.fused(False)
    classes, layer, scale = protocol.train_classifier(embeddings, split.labels, split.parts)

    # the same start and the same batches, then Nesterov SGD with weight decay written out
    known = (split.parts == Part.TRAIN) | (split.parts == Part.REFERENCE)
    features = F.normalize(embeddings[known], dim=1)
    targets = torch.searchsorted(classes, split.labels[known])
    weight = torch.stack([F.normalize(features[targets == c].sum(0), dim=0) for c in range(len(classes))])
    bias, alpha = torch.zeros(len(classes)), torch.tensor(16.0)
    velocity = [torch.zeros_like(weight), torch.zeros_like(bias), torch.zeros(())]
    batches = draw_batches(targets, len(classes), 3, 7, torch.Generator().manual_seed(3))
    for step, batch in enumerate(batches):
        x, y = features[batch], targets[batch]
        scores = alpha * x @ weight.T + bias
        probabilities = torch.softmax(scores, dim=1)
        d_scores = (probabilities - F.one_hot(y, len(classes))) / len(batch)  # d mean cross-entropy
        grads = [d_scores.T @ (alpha * x), d_scores.sum(0), (d_scores * (x @ weight.T)).sum()]
        lr = 0.05 + 0.45 * (1 + math.cos(math.pi * step / 6)) / 2
        new = []
        for value, grad, v in zip((weight, bias, alpha), grads, velocity):
            grad = grad + 5e-4 * value
            v.mul_(0.9).add_(grad)
            new.append(value - lr * (grad + 0.9 * v))
        weight, bias, alpha = new
    assert torch.allclose(layer.weight, weight, atol=1e-5)
    assert torch.allclose(layer.bias, bias, atol=1e-5)
    assert float(scale) == pytest.approx(float(alpha), abs=1e-4)


def test_settings_that_cannot_train_are_refused():
    with pytest.raises(ValueError, match="iterations"):
        ClassifierLearningProtocol(iterations=-1)
    with pytest.raises(ValueError, match="lr_end"):
        ClassifierLearningProtocol(lr=1e-4, lr_end=1e-3)
