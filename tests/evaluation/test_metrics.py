import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestNeighbors

from doppel.data.dataset import Part
from doppel.evaluation.metrics import classify_by_prototypes, coverage_at_precision, recall_at_k, top1_accuracy
from doppel.evaluation.prototype import PrototypeProtocol
from doppel.evaluation.prototype import prototype_metrics as evaluate_protocol


def test_coverage_hand_computed_with_a_tie_and_a_dip():
    confidence = torch.tensor([0.9, 0.8, 0.8, 0.7, 0.6])
    correct = torch.tensor([True, True, False, True, True])
    # thresholds answer 1, 3 (the tie enters together), 4, 5 queries: precision 1, 2/3, 3/4, 4/5
    assert coverage_at_precision(confidence, correct, 0.99) == pytest.approx(0.2)
    assert coverage_at_precision(confidence, correct, 0.8) == pytest.approx(1.0)
    assert coverage_at_precision(confidence, correct, 0.78) == pytest.approx(1.0)
    assert coverage_at_precision(confidence, correct, 0.75) == pytest.approx(1.0)
    # precision dips to 2/3 at 3 answers and recovers: coverage is over all thresholds
    assert coverage_at_precision(confidence, correct, 0.7) == pytest.approx(1.0)
    assert coverage_at_precision(confidence, correct, 0.85) == pytest.approx(0.2)
    # order of the input does not matter
    perm = torch.tensor([3, 0, 4, 2, 1])
    assert coverage_at_precision(confidence[perm], correct[perm], 0.8) == pytest.approx(1.0)


def test_coverage_edge_cases():
    assert coverage_at_precision(torch.tensor([0.5, 0.4]), torch.tensor([False, True]), 0.99) == 0.0
    assert coverage_at_precision(torch.ones(4), torch.tensor([True] * 4), 0.999) == 1.0
    # all tied: one step only; 3 of 4 correct is below 99%
    assert coverage_at_precision(torch.ones(4), torch.tensor([True, True, True, False]), 0.99) == 0.0


def test_recall_at_1_matches_sklearn_neighbours():
    generator = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(200, 8, generator=generator), dim=1)
    labels = torch.randint(0, 30, (200,), generator=generator)
    labels[0] = 99  # a singleton: skipped
    nn_ = NearestNeighbors(n_neighbors=2, metric="cosine").fit(x.numpy())
    _, idx = nn_.kneighbors(x.numpy())
    neighbour = np.where(idx[:, 0] == np.arange(200), idx[:, 1], idx[:, 0])
    keep = np.array([(labels == labels[i]).sum() > 1 for i in range(200)])
    expected = (labels.numpy()[neighbour] == labels.numpy())[keep].mean()
    assert recall_at_k(x, labels, k=1, chunk=37) == pytest.approx(expected)


def test_classify_by_prototypes_and_top1():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    queries = torch.nn.functional.normalize(torch.tensor([[2.0, 1.0], [0.1, 1.0], [1.0, 1.1]]), dim=1)
    predicted, confidence = classify_by_prototypes(queries, protos, torch.tensor([7, 9]), chunk=2)
    assert predicted.tolist() == [7, 9, 9]
    assert confidence[0] == pytest.approx(2 / 5**0.5)
    assert top1_accuracy(predicted, torch.tensor([7, 9, 7])) == pytest.approx(2 / 3)


def test_protocol_on_a_hand_built_case():
    e = {  # unit vectors by angle (degrees)
        a: torch.tensor([np.cos(np.radians(a)), np.sin(np.radians(a))], dtype=torch.float32)
        for a in (0, 10, 5, 90, 100, 95, 180, 170, 45, 50, 270, 260, 200)
    }
    rows = [  # (angle, label, role)
        (0, 0, Part.TRAIN), (10, 0, Part.TRAIN), (5, 0, Part.HELD_OUT),
        (90, 1, Part.TRAIN), (100, 1, Part.TRAIN), (45, 1, Part.HELD_OUT),  # 45: nearer class 0's 5
        (180, 2, Part.REFERENCE), (170, 2, Part.QUERY), (200, 2, Part.QUERY),
        (270, 3, Part.REFERENCE), (260, 3, Part.QUERY),
    ]
    x = torch.stack([e[a] for a, _, _ in rows])
    labels = torch.tensor([r[1] for r in rows])
    roles = torch.tensor([int(r[2]) for r in rows])
    m = evaluate_protocol(x, labels, roles)
    # base prototypes at 5 and 95 degrees; query 45 is 40 from class 0 and 50 from class 1: wrong
    assert m["base/top1"] == pytest.approx(0.5)
    assert m["base/coverage@0.99"] == pytest.approx(0.5)  # the confident query (5 deg) is right
    assert m["novel/top1"] == pytest.approx(1.0)
    assert m["novel/coverage@0.999"] == pytest.approx(1.0)
    # recall@1 within base images: 0<->10<->5 fine; 90,100 fine; 45's nearest is 10 (35 deg) vs 90 (45): miss
    assert m["base/recall@1"] == pytest.approx(5 / 6)
    assert m["novel/recall@1"] == pytest.approx(1.0)


def test_mirror_trick_sums_the_embeddings_of_the_image_and_its_mirror_then_normalises():
    from doppel.evaluation.protocol import Embedded

    def mirror_embed(model, images):
        return Embedded(model(images), model(images.flip(-1))).fused(flip=True)

    # f(x) = (sum of the left column, sum of the right column): not mirror-invariant
    def model(images):
        return torch.stack([images[..., 0].sum((1, 2)), images[..., 1].sum((1, 2))], dim=1)

    image = torch.tensor([[[[3.0, 1.0]]]])  # one 1x1x2 image: left 3, right 1
    # f(x) = (3, 1), f(mirror) = (1, 3): sum (4, 4), normalised (1/sqrt2, 1/sqrt2)
    assert torch.allclose(mirror_embed(model, image), torch.tensor([[0.5**0.5, 0.5**0.5]]))
    lopsided = torch.tensor([[[[4.0, 0.0]]]])
    assert torch.allclose(mirror_embed(model, lopsided), torch.tensor([[0.5**0.5, 0.5**0.5]]))


def test_base_and_novel_prototypes_compete_for_every_query():
    def at(degrees):
        return torch.tensor([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))], dtype=torch.float32)

    rows = [  # (angle, label, role)
        (0, 0, Part.TRAIN), (2, 0, Part.TRAIN), (88, 0, Part.HELD_OUT),  # query nearest novel 1's prototype
        (180, 1, Part.TRAIN), (182, 1, Part.TRAIN), (181, 1, Part.HELD_OUT),
        (90, 2, Part.REFERENCE), (3, 2, Part.QUERY),  # query nearest base 0's prototype
        (270, 3, Part.REFERENCE), (265, 3, Part.QUERY),
    ]
    x = torch.stack([at(a) for a, _, _ in rows])
    labels = torch.tensor([r[1] for r in rows])
    roles = torch.tensor([int(r[2]) for r in rows])
    m = evaluate_protocol(x, labels, roles)
    # within its own split each query would be right; among all prototypes one of each split is wrong
    assert m["base/top1"] == pytest.approx(0.5) and m["novel/top1"] == pytest.approx(0.5)
    assert sorted(m) == sorted(PrototypeProtocol().metric_names())
