"""Every loss term against a naive loop written from its paper's equation: value and gradient, float64."""

import math

import pytest
import torch

from doppel.losses import exemplar as E
from doppel.losses import prototype as P
from doppel.losses import regularizers as R
from tests.losses import reference as ref

DIM, CLASSES = 6, 5


def batch(seed=0, n=14, dim=DIM, classes=CLASSES, per_class=None):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    if per_class:
        labels = torch.arange(n // per_class).repeat_interleave(per_class)
    else:
        labels = torch.randint(0, classes, (n,), generator=generator)
    return x, labels


def assert_matches(term, naive, x, labels):
    """Equal loss, equal gradient for the input and for every trainable parameter of the term."""
    term = term.double()
    x1 = x.clone().requires_grad_(True)
    loss = term(x1, labels)
    loss.backward()
    param_grads = {n: p.grad.clone() for n, p in term.named_parameters() if p.grad is not None}
    term.zero_grad()
    x2 = x.clone().requires_grad_(True)
    expected = naive(x2, labels)
    expected.backward()
    assert torch.allclose(loss, expected, rtol=1e-9, atol=1e-12), (loss.item(), expected.item())
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-7, atol=1e-12)
    for name, grad in param_grads.items():
        assert torch.allclose(grad, dict(term.named_parameters())[name].grad, rtol=1e-7, atol=1e-12), name
    return loss


# -- prototype terms ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_softmax_matches_naive(seed):
    term = P.Softmax(DIM, CLASSES)
    x, labels = batch(seed)
    assert_matches(term, lambda x, y: ref.softmax(x, y, term.classifier.weight, term.classifier.bias), x, labels)
    assert torch.allclose(term.loss_and_logits(x, labels)[1].logits, term.classifier(x))


def test_normface_matches_naive():
    term = P.NormFace(DIM, CLASSES, scale=16.0)
    x, labels = batch(2)
    assert_matches(term, lambda x, y: ref.margin_softmax(x, y, term.weight, lambda c: c, term.scale), x, labels)
    assert term.scale.grad is not None  # trainable s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cosface_matches_eq19(seed):
    term = P.CosFace(DIM, CLASSES)
    x, labels = batch(seed)
    assert_matches(term, lambda x, y: ref.margin_softmax(x, y, term.weight, lambda c: c - 0.35, 64.0), x, labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arcface_matches_cos_theta_plus_m(seed):
    term = P.ArcFace(DIM, CLASSES)
    x, labels = batch(seed)
    assert_matches(term, lambda x, y: ref.margin_softmax(x, y, term.weight, ref.arcface_psi(0.45), 64.0), x, labels)


def test_arcface_rule_beyond_pi_minus_m_keeps_the_target_decreasing():
    term = P.ArcFace(2, 2, margin=0.45).double()
    cos = torch.cos(torch.linspace(0.01, math.pi - 0.01, 400, dtype=torch.float64))
    target = term.target_logit(cos)
    assert (target[1:] < target[:-1]).all()  # monotone in theta, so the gradient never pulls the wrong way
    beyond = torch.acos(cos) > math.pi - 0.45
    assert torch.allclose(target[beyond], cos[beyond] - 0.45 * math.sin(0.45))
    assert torch.allclose(target[~beyond], torch.cos(torch.acos(cos[~beyond]) + 0.45))


@pytest.mark.parametrize("margin", [1, 2, 3, 4])
def test_sphereface_matches_eq3_with_and_without_feature_scale(margin):
    x, labels = batch(margin)
    term = P.SphereFace(DIM, CLASSES, margin=margin, scale=64.0, anneal=False).eval()
    assert_matches(term, lambda x, y: ref.margin_softmax(x, y, term.weight, ref.multiplicative_psi(margin), 64.0),
                   x, labels)
    term = P.SphereFace(DIM, CLASSES, margin=margin, scale=None, anneal=False).eval()
    assert_matches(term, lambda x, y: ref.margin_softmax(x, y, term.weight, ref.multiplicative_psi(margin), None),
                   x, labels)


def test_sphereface_annealing_follows_the_schedule_and_the_formula():
    term = P.SphereFace(DIM, CLASSES, margin=3, lambda_base=1000.0, lambda_min=5.0, gamma=0.12, power=1.0)
    x, labels = batch(5)
    lambdas = []
    for _ in range(3):
        lambdas.append(term.annealing_lambda)
        term(x.float(), labels)
    assert lambdas == pytest.approx([1000.0, 1000.0 / 1.12, 1000.0 / 1.24])
    term.step.fill_(10**6)
    assert term.annealing_lambda == 5.0
    term.eval()  # eval calls do not advance the schedule
    lam = term.annealing_lambda
    assert_matches(term, lambda x, y: ref.margin_softmax(x, y, term.weight, ref.multiplicative_psi(3, lam), 64.0),
                   x, labels)
    assert int(term.step) == 10**6


def test_lsoftmax_matches_eq2_with_weight_and_feature_norms():
    term = P.LargeMarginSoftmax(DIM, CLASSES, margin=4, anneal=False).eval()
    x, labels = batch(7)
    assert_matches(term, lambda x, y: ref.margin_softmax(x, y, term.weight, ref.multiplicative_psi(4), None,
                                                         normalize_weights=False), x, labels)
    # its mining logits are the plain linear ones, W_j . f, off the target column (which the miner skips)
    logits = term.loss_and_logits(x, labels)[1].logits.detach()
    off_target = torch.ones_like(logits, dtype=torch.bool)
    off_target[torch.arange(len(labels)), labels] = False
    assert torch.allclose(logits[off_target], (x @ term.weight.detach().T)[off_target])


def test_multiplicative_margin_must_be_an_integer():
    with pytest.raises(ValueError, match="positive integer"):
        P.SphereFace(DIM, CLASSES, margin=1.5)


def test_center_loss_matches_eq4():
    term = P.CenterLoss(DIM, CLASSES)
    x, labels = batch(3)
    assert_matches(term, lambda x, y: ref.center(x, y, term.centres), x, labels)


@pytest.mark.parametrize("variance,q_fraction", [("batch", 1.0), ("batch", 0.2), ("learned", 0.5), ("fixed", 1.0)])
def test_ie_loss_matches_eq6(variance, q_fraction):
    term = P.IELoss(DIM, CLASSES, alpha=0.1, q_fraction=q_fraction, variance=variance, initial_variance=2.0)
    with torch.no_grad():
        term.centres.normal_(0, 1, generator=torch.Generator().manual_seed(1))
    x, labels = batch(4, n=16)
    fixed = "batch" if variance == "batch" else None
    assert_matches(term, lambda x, y: ref.ie(x, y, term.centres, 0.1, q_fraction,
                                             fixed or term.log_variance.exp()), x, labels)
    assert (term.log_variance.grad is not None) == (variance == "learned")


def test_ie_loss_reduces_to_eq7_with_one_centre_and_variance_half():
    term = P.IELoss(DIM, CLASSES, alpha=0.3, q_fraction=1e-6, variance="fixed", initial_variance=0.5).double()
    with torch.no_grad():
        term.centres.normal_(0, 1, generator=torch.Generator().manual_seed(2))
    x, labels = batch(5, n=16)
    loss = term(x, labels)
    c = term.centres.detach()
    present = labels.unique()
    eq7 = []
    for i in range(len(x)):
        own = (x[i] - c[labels[i]]).pow(2).sum()
        nearest = min((x[i] - c[k]).pow(2).sum() for k in present if k != labels[i])
        eq7.append(torch.relu(own + 0.3 - nearest))
    assert torch.allclose(loss, torch.stack(eq7).mean())


def test_ie_loss_options_are_checked():
    with pytest.raises(ValueError, match="variance"):
        P.IELoss(DIM, CLASSES, variance="moving")
    with pytest.raises(ValueError, match="q_fraction"):
        P.IELoss(DIM, CLASSES, q_fraction=0.0)


# -- exemplar terms ----------------------------------------------------------------------------
@pytest.mark.parametrize("power,reduction", [(2, "mean"), (1, "mean"), (1, "mean_nonzero")])
def test_contrastive_matches_naive(power, reduction):
    x, labels = batch(1)
    term = E.ContrastiveLoss(pos_margin=0.1, neg_margin=1.2, power=power, reduction=reduction)
    assert_matches(term, lambda x, y: ref.contrastive(x, y, 0.1, 1.2, power, reduction == "mean_nonzero"), x, labels)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
def test_triplet_matches_eq2_over_all_triplets(seed, reduction):
    x, labels = batch(seed)
    term = E.TripletLoss(margin=1.0, reduction=reduction)
    assert_matches(term, lambda x, y: ref.triplet(x, y, 1.0, reduction == "mean_nonzero"), x, labels)


def test_triplet_with_uneven_classes_and_small_margin():
    x, labels = batch(9, n=15, classes=3)
    assert_matches(E.TripletLoss(margin=0.3), lambda x, y: ref.triplet(x, y, 0.3), x, labels)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_semihard_facenet_rule_matches_naive(seed):
    x, labels = batch(seed)
    assert_matches(E.SemiHardTripletLoss(margin=0.2), lambda x, y: ref.semihard_facenet(x, y, 0.2), x, labels)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_semihard_all_rule_matches_naive(seed):
    x, labels = batch(seed, n=20)
    term = E.SemiHardTripletLoss(margin=0.5, rule="all")
    assert_matches(term, lambda x, y: ref.semihard_all(x, y, 0.5), x, labels)


@pytest.mark.parametrize("seed", [0, 1])
def test_normalized_npair_matches_eq3(seed):
    x, labels = batch(seed)
    assert_matches(E.NormalizedNPairLoss(scale=25.0), lambda x, y: ref.npair(x, y, 25.0), x, labels)


def test_ntxent_matches_simclr_form_on_two_views():
    x, _ = batch(3, n=12)
    labels = torch.tensor([4, 0, 4, 1, 2, 2]).repeat(2)  # two views of 6 images, classes repeat on purpose
    assert_matches(E.NTXentLoss(temperature=0.5), lambda x, y: ref.ntxent_views(x, 0.5), x, labels)


def test_ntxent_views_need_stacked_views():
    with pytest.raises(ValueError, match="loss.views=2"):
        E.NTXentLoss()(torch.randn(6, 4), torch.arange(6))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_similarity_matches_naive_with_mining(seed):
    x, labels = batch(seed, n=16)
    term = E.MultiSimilarityLoss(epsilon=0.1, base=0.5, alpha=2.0, beta=40.0)
    assert_matches(term, lambda x, y: ref.multi_similarity(x, y, 0.1, 0.5, 2.0, 40.0), x, labels)


# -- regularisers ------------------------------------------------------------------------------
def test_sec_matches_eq17_and_its_gradient_is_eq18():
    x, labels = batch(0)
    term = R.SphericalEmbeddingConstraint()
    loss = assert_matches(term, lambda x, y: ref.sec(x), x, labels)
    x1 = x.clone().requires_grad_(True)
    term(x1, labels).backward()
    norms = x.norm(dim=1, keepdim=True)
    eq18 = 2 / len(x) * (norms - norms.mean()) * x / norms
    assert torch.allclose(x1.grad, eq18)
    assert loss > 0


def test_sec_running_mean_and_ramp():
    term = R.SphericalEmbeddingConstraint(mu="running", momentum=0.25, ramp_steps=4).double()
    norms_seen = []
    for seed in range(3):
        x, labels = batch(seed)
        ramp = min(1.0, seed / 4)
        expected_mu = x.norm(dim=1).mean() if seed == 0 else 0.75 * norms_seen[-1] + 0.25 * x.norm(dim=1).mean()
        norms_seen.append(expected_mu)
        loss = term(x, labels)
        assert torch.allclose(term.running_mu, expected_mu)
        assert torch.allclose(loss, ramp * ref.sec(x, expected_mu))
    assert term.scalars()["ramp"] == pytest.approx(0.5)  # the factor the last call used


def test_l2reg_is_mean_squared_norm():
    x, labels = batch(1)
    assert_matches(R.L2Reg(), lambda x, y: ref.sec(x, mu=0.0), x, labels)


# -- custom gradients and autograd of every deterministic term pass gradcheck --------------------
GRADCHECK_TERMS = [
    lambda: P.Softmax(DIM, CLASSES), lambda: P.L2Softmax(DIM, CLASSES), lambda: P.NormFace(DIM, CLASSES),
    lambda: P.CosFace(DIM, CLASSES, scale=4.0), lambda: P.ArcFace(DIM, CLASSES, scale=4.0),
    lambda: P.SphereFace(DIM, CLASSES, scale=4.0), lambda: P.LargeMarginSoftmax(DIM, CLASSES, margin=2),
    # variance="batch" is detached by design (eq. 8-10 treat s2 as independent), so finite differences differ
    lambda: P.CenterLoss(DIM, CLASSES), lambda: P.IELoss(DIM, CLASSES, variance="learned"),
    lambda: E.LiftedStructured(scale=2.0), lambda: E.ContrastiveLoss(), lambda: E.TripletLoss(),
    lambda: E.SemiHardTripletLoss(), lambda: E.SemiHardTripletLoss(rule="all", margin=0.5),
    lambda: E.NormalizedNPairLoss(scale=4.0), lambda: E.NTXentLoss(positives="labels"), lambda: E.MultiSimilarityLoss(),
    lambda: R.SphericalEmbeddingConstraint(), lambda: R.L2Reg(),
]


@pytest.mark.parametrize("make", GRADCHECK_TERMS)
def test_gradcheck_float64(make):
    term = make().double().eval()  # eval: annealing schedules stay put between gradcheck's calls
    x, labels = batch(11, n=10, per_class=2)
    assert torch.autograd.gradcheck(lambda v: term(v, labels), (x.requires_grad_(True),), eps=1e-6, atol=1e-5)
