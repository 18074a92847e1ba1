"""Degenerate batches give a finite loss with a finite gradient, or one clear error; never NaN."""

import pytest
import torch

from doppel.losses import exemplar as E
from doppel.losses import prototype as P
from doppel.losses import regularizers as R

DIM, CLASSES = 6, 5

PROTOTYPE = {
    "softmax": lambda: P.Softmax(DIM, CLASSES), "l2s": lambda: P.L2Softmax(DIM, CLASSES),
    "normface": lambda: P.NormFace(DIM, CLASSES), "cosface": lambda: P.CosFace(DIM, CLASSES),
    "arcface": lambda: P.ArcFace(DIM, CLASSES), "sphereface": lambda: P.SphereFace(DIM, CLASSES),
    "lsoftmax": lambda: P.LargeMarginSoftmax(DIM, CLASSES), "center": lambda: P.CenterLoss(DIM, CLASSES),
    "ie": lambda: P.IELoss(DIM, CLASSES), "ie_learned": lambda: P.IELoss(DIM, CLASSES, variance="learned"),
}
OTHER = {
    "lifted": E.LiftedStructured, "margin": E.CosineMarginLoss, "contrastive": E.ContrastiveLoss,
    "triplet": E.TripletLoss, "triplet_nonzero": lambda: E.TripletLoss(reduction="mean_nonzero"),
    "semihard": E.SemiHardTripletLoss, "semihard_all": lambda: E.SemiHardTripletLoss(rule="all"),
    "npair": E.NormalizedNPairLoss, "ntxent": E.NTXentLoss, "ntxent_labels": lambda: E.NTXentLoss(positives="labels"),
    "ms": E.MultiSimilarityLoss, "sec": R.SphericalEmbeddingConstraint,
    "sec_running": lambda: R.SphericalEmbeddingConstraint(mu="running"), "l2reg": R.L2Reg,
}
ALL = {**PROTOTYPE, **OTHER}


def cases():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, DIM, generator=g)
    zero_row = x.clone()
    zero_row[3] = 0
    two_views = torch.tensor([0, 1, 2, 3]).repeat(2)
    return {
        "single class": (x, torch.zeros(8, dtype=torch.long)),
        "singletons": (x[:CLASSES], torch.arange(CLASSES)),
        "one example of a class": (x, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])),
        "identical embeddings": (torch.ones(8, DIM), two_views),
        "an all-zero embedding": (zero_row, two_views),
        "all-zero embeddings": (torch.zeros(8, DIM), two_views),
    }


@pytest.mark.parametrize("case", list(cases()))
@pytest.mark.parametrize("name", list(ALL))
def test_degenerate_batches_are_finite(name, case):
    x, labels = cases()[case]
    term = ALL[name]()
    if name == "ntxent" and not torch.equal(labels[:4], labels[4:]):
        with pytest.raises(ValueError, match="loss.views=2"):
            term(x, labels)
        return
    x = x.clone().requires_grad_(True)
    loss = term(x, labels)
    loss.backward()
    assert torch.isfinite(loss), f"{name} on {case}: {loss}"
    assert torch.isfinite(x.grad).all(), f"{name} on {case}: gradient {x.grad}"
    for param_name, param in term.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), f"{name}.{param_name} on {case}"


@pytest.mark.parametrize("name", list(PROTOTYPE))
@pytest.mark.parametrize("bad", [[0, 1, CLASSES], [-1, 0, 1]])
def test_labels_outside_the_classifier_are_one_clear_error(name, bad):
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, {CLASSES}\)"):
        PROTOTYPE[name]()(torch.randn(3, DIM), torch.tensor(bad))


def test_pair_terms_with_nothing_to_compare_are_exactly_zero():
    x = torch.randn(5, DIM)
    singletons = torch.arange(5)
    for term in (E.ContrastiveLoss(pos_margin=0.0, neg_margin=0.0), E.TripletLoss(), E.SemiHardTripletLoss(),
                 E.NormalizedNPairLoss(), E.MultiSimilarityLoss(), E.LiftedStructured()):
        assert term(x, singletons) == 0  # no positive pair anywhere


def test_ie_loss_of_a_single_class_batch_is_zero():
    assert P.IELoss(DIM, CLASSES)(torch.randn(4, DIM), torch.zeros(4, dtype=torch.long)) == 0
