"""Equal values and gradients to pytorch-metric-learning (test-only dependency) with matched settings.

Where our default differs from PML's on purpose, the test sets ours to PML's definition and says how.
"""

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.regularizers import LpRegularizer

from doppel.losses import exemplar as E
from doppel.losses import prototype as P
from doppel.losses import regularizers as R

DIM, CLASSES = 8, 6


def batch(seed, n=24, per_class=4, unit_norm=False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=generator, dtype=torch.float64)
    if unit_norm:
        x = torch.nn.functional.normalize(x, dim=1)
    labels = torch.arange(n // per_class).repeat_interleave(per_class)
    return x, labels[torch.randperm(n, generator=generator)]


def both(ours, theirs, x, labels, theirs_miner=None, atol=1e-10):
    """Loss and input gradient of both; PML's NT-Xent adds a tiny constant inside its log, hence atol."""
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a = ours(x1, labels)
    a.backward()
    indices = theirs_miner(x2, labels) if theirs_miner else None
    b = theirs(x2, labels, indices) if indices is not None else theirs(x2, labels)
    b.backward()
    assert torch.allclose(a, b, atol=atol, rtol=1e-8), (a.item(), b.item())
    assert torch.allclose(x1.grad, x2.grad, atol=atol * 10, rtol=1e-6)
    return a


SQUARED = dict(distance=LpDistance(normalize_embeddings=True, p=2, power=2))


@pytest.mark.parametrize("seed", [0, 1])
def test_triplet_all_triplets(seed):
    x, labels = batch(seed)
    # ours "mean" averages every triplet; PML's default reducer averages the non-zero ones
    both(E.TripletLoss(1.0, reduction="mean"),
         pml_losses.TripletMarginLoss(margin=1.0, reducer=pml_reducers.MeanReducer(), **SQUARED), x, labels)
    both(E.TripletLoss(1.0, reduction="mean_nonzero"), pml_losses.TripletMarginLoss(margin=1.0, **SQUARED), x, labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semihard_all_rule_equals_pml_semihard_miner(seed):
    x, labels = batch(seed)
    miner = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard", **SQUARED)
    both(E.SemiHardTripletLoss(0.2, rule="all"), pml_losses.TripletMarginLoss(margin=0.2, **SQUARED), x, labels,
         theirs_miner=miner)


def test_semihard_facenet_rule_differs_from_pml_on_purpose():
    # FaceNet's rule takes one negative per positive pair (and the farthest when none is semi-hard);
    # PML's miner takes every semi-hard triplet. Same embeddings, different losses:
    x, labels = batch(0)
    ours = E.SemiHardTripletLoss(0.2, rule="facenet")(x, labels)
    miner = pml_miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard", **SQUARED)
    theirs = pml_losses.TripletMarginLoss(margin=0.2, **SQUARED)(x, labels, miner(x, labels))
    assert not torch.isclose(ours, theirs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_similarity_with_its_miner(seed):
    x, labels = batch(seed)
    both(E.MultiSimilarityLoss(0.1, 0.5, 2.0, 40.0), pml_losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5),
         x, labels, theirs_miner=pml_miners.MultiSimilarityMiner(epsilon=0.1))


def test_contrastive():
    x, labels = batch(3)
    # PML's is the linear form (power 1); ours defaults to Hadsell's squared form
    both(E.ContrastiveLoss(0.0, 1.0, power=1, reduction="mean_nonzero"),
         pml_losses.ContrastiveLoss(pos_margin=0, neg_margin=1), x, labels)
    both(E.ContrastiveLoss(0.1, 0.8, power=1, reduction="mean"),
         pml_losses.ContrastiveLoss(pos_margin=0.1, neg_margin=0.8, reducer=pml_reducers.MeanReducer()), x, labels)


def test_lifted_structure():
    x, labels = batch(4)
    # ours scales the normalised embedding by a trainable factor (Doppelganger paper); 1 and frozen = PML
    both(E.LiftedStructured(margin=1.0, scale=1.0, trainable_scale=False),
         pml_losses.LiftedStructureLoss(neg_margin=1, pos_margin=0), x, labels)


def test_normalized_npair_equals_pml_ntxent_with_temperature_one_over_s():
    # PML's NPairsLoss is Sohn's original (one positive per anchor, unnormalised dot products, other
    # anchors' positives as negatives); eq. (3) of the SEC paper is PML's NT-Xent form with t = 1/s.
    x, labels = batch(5)
    both(E.NormalizedNPairLoss(scale=25.0), pml_losses.NTXentLoss(temperature=1 / 25), x, labels, atol=1e-9)


def test_ntxent_on_two_views():
    x, _ = batch(6)
    classes = torch.tensor([0, 1, 1, 2, 3, 3, 4, 5, 5, 0, 2, 4])
    ours = E.NTXentLoss(temperature=0.5)
    # PML takes the views' pairing as labels: image i's two views share label i
    views = torch.arange(12).repeat(2)
    x1 = x.clone().requires_grad_(True)
    a = ours(x1, classes.repeat(2))
    a.backward()
    x2 = x.clone().requires_grad_(True)
    b = pml_losses.NTXentLoss(temperature=0.5)(x2, views)
    b.backward()
    assert torch.allclose(a, b, atol=1e-9) and torch.allclose(x1.grad, x2.grad, atol=1e-8)


def copy_classifier(ours, theirs):
    with torch.no_grad():
        theirs.W.copy_(ours.weight.T)


def prototype_pair(ours, theirs, x, labels):
    copy_classifier(ours, theirs)
    both(ours, theirs, x, labels)
    assert torch.allclose(ours.weight.grad, theirs.W.grad.T, atol=1e-9)


def test_normface_equals_pml_normalized_softmax():
    x, labels = batch(8)
    # PML's temperature is 1 / s; ours trains s by default, frozen here
    prototype_pair(P.NormFace(DIM, CLASSES, scale=20.0, trainable_scale=False).double(),
                   pml_losses.NormalizedSoftmaxLoss(CLASSES, DIM, temperature=0.05).double(), x, labels)


@pytest.mark.parametrize("seed", [0, 1])
def test_cosface(seed):
    x, labels = batch(seed)
    prototype_pair(P.CosFace(DIM, CLASSES, 64.0, 0.35).double(),
                   pml_losses.CosFaceLoss(CLASSES, DIM, margin=0.35, scale=64).double(), x, labels)


@pytest.mark.parametrize("seed", [0, 1])
def test_arcface(seed):
    x, labels = batch(seed)
    # PML takes the margin in degrees; the theta > pi - m rule is the same
    prototype_pair(P.ArcFace(DIM, CLASSES, 64.0, 0.45).double(),
                   pml_losses.ArcFaceLoss(CLASSES, DIM, margin=math.degrees(0.45), scale=64).double(), x, labels)


@pytest.mark.parametrize("margin", [2, 3, 4])
def test_sphereface_without_annealing(margin):
    # The original form (scale=None, magnitude ||f||) is PML's SphereFaceLoss with scale 1:
    x, labels = batch(margin + 10)
    prototype_pair(P.SphereFace(DIM, CLASSES, margin, None, anneal=False).double(),
                   pml_losses.SphereFaceLoss(CLASSES, DIM, margin=margin, scale=1).double(), x, labels)
    # The SEC paper's fixed s = 64 has no PML counterpart: PML always multiplies by ||f||. On unit-norm
    # embeddings with PML's scale = 64 the values agree and the gradients differ only along f (PML's
    # derivative of ||f||), so their tangential parts agree.
    x, labels = batch(margin, unit_norm=True)
    ours = P.SphereFace(DIM, CLASSES, margin, 64.0, anneal=False).double()
    theirs = pml_losses.SphereFaceLoss(CLASSES, DIM, margin=margin, scale=64).double()
    copy_classifier(ours, theirs)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a, b = ours(x1, labels), theirs(x2, labels)
    a.backward()
    b.backward()
    tangential = x2.grad - (x2.grad * x).sum(1, keepdim=True) * x
    assert torch.allclose(a, b) and torch.allclose(x1.grad, tangential, atol=1e-10)
    assert torch.allclose(ours.weight.grad, theirs.W.grad.T, atol=1e-9)


@pytest.mark.parametrize("margin", [2, 4])
def test_large_margin_softmax_without_annealing(margin):
    x, labels = batch(margin)
    prototype_pair(P.LargeMarginSoftmax(DIM, CLASSES, margin, anneal=False).double(),
                   pml_losses.LargeMarginSoftmaxLoss(CLASSES, DIM, margin=margin, scale=1).double(), x, labels)


def test_l2reg_equals_lp_regularizer_power_two():
    x, labels = batch(7)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    a = R.L2Reg()(x1, labels)
    b = LpRegularizer(p=2, power=2)(x2)
    a.backward()
    b.backward()
    assert torch.allclose(a, b) and torch.allclose(x1.grad, x2.grad)
