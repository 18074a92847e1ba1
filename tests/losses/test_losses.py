import math

import pytest
import torch

from doppel.losses.exemplar import CosineMarginLoss, LiftedStructured
from doppel.losses.prototype import L2Softmax


def batch(seed=0, n=12, dim=6, classes=4):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return x, labels


def unit(v):
    return v / math.sqrt(sum(float(a) ** 2 for a in v))


def test_l2softmax_matches_naive_formula_and_gradient():
    x, labels = batch()
    term = L2Softmax(6, 4, scale=16.0).double()
    x1 = x.clone().requires_grad_(True)
    loss = term(x1, labels)
    loss.backward()

    x2 = x.clone().requires_grad_(True)
    alpha = term.scale.detach().clone().requires_grad_(True)
    total = 0.0
    for i in range(len(x2)):
        z = alpha * x2[i] / x2[i].norm()
        logits = [term.classifier.weight[c].detach() @ z + term.classifier.bias[c].detach() for c in range(4)]
        log_norm = torch.logsumexp(torch.stack(logits), 0)
        total = total + (log_norm - logits[labels[i]])
    naive = total / len(x2)
    naive.backward()
    assert torch.allclose(loss, naive)
    assert torch.allclose(x1.grad, x2.grad)
    assert torch.allclose(term.scale.grad, alpha.grad)
    assert term.loss_and_logits(x1, labels)[1].logits.shape == (12, 4)


def test_l2softmax_rejects_labels_outside_classifier():
    term = L2Softmax(6, 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        term(torch.randn(3, 6), torch.tensor([0, 1, 4]))


def naive_lifted(x, labels, margin, scale):
    z = [scale * xi / xi.norm() for xi in x]
    n = len(z)
    dist = [[(z[i] - z[j]).pow(2).sum().clamp_min(1e-12).sqrt() for j in range(n)] for i in range(n)]
    terms = []
    for i in range(n):
        for j in range(i + 1, n):
            if labels[i] != labels[j]:
                continue
            negs = [torch.exp(margin - dist[i][k]) for k in range(n) if labels[k] != labels[i]]
            negs += [torch.exp(margin - dist[j][k]) for k in range(n) if labels[k] != labels[j]]
            j_ij = torch.log(torch.stack(negs).sum()) + dist[i][j]
            terms.append(torch.relu(j_ij) ** 2)
    return torch.stack(terms).sum() / (2 * len(terms))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lifted_structured_matches_naive_eq4(seed):
    x, labels = batch(seed)
    term = LiftedStructured(margin=1.0, scale=3.0).double()
    x1 = x.clone().requires_grad_(True)
    loss = term(x1, labels)
    loss.backward()
    x2 = x.clone().requires_grad_(True)
    naive = naive_lifted(x2, labels, 1.0, term.scale.detach())
    naive.backward()
    assert torch.allclose(loss, naive)
    assert torch.allclose(x1.grad, x2.grad)
    assert term.scale.grad is not None and torch.isfinite(term.scale.grad)


def test_lifted_edge_cases_are_finite():
    term = LiftedStructured()
    one_class = term(torch.randn(5, 4, requires_grad=True), torch.zeros(5, dtype=torch.long))
    singletons = term(torch.randn(5, 4), torch.arange(5))
    same = torch.ones(6, 4, requires_grad=True)
    identical = term(same, torch.tensor([0, 0, 1, 1, 2, 2]))
    identical.backward()
    assert torch.isfinite(one_class) and singletons == 0 and torch.isfinite(identical)
    assert torch.isfinite(same.grad).all()


def test_margin_pairs_are_one_or_none_per_anchor_with_positive_violation():
    x, labels = batch(3, n=16, classes=3)
    term = CosineMarginLoss(alpha=0.1, beta=0.5).double()
    s = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    anchor, partner, y = term.sample_pairs(s, labels)
    for sign in (1.0, -1.0):
        chosen = anchor[y == sign].tolist()
        assert len(chosen) == len(set(chosen))
    for a, p, sign in zip(anchor.tolist(), partner.tolist(), y.tolist()):
        assert a != p
        assert (labels[a] == labels[p]) == (sign > 0)
        violation = (0.6 - s[a, p]) if sign > 0 else (s[a, p] - 0.4)
        assert violation > 0


def test_margin_sampling_frequencies_follow_eq5():
    # one anchor, three negatives with violations 0.1, 0.2, 0.3 and one with none
    s = torch.tensor([[1.0, 0.5, 0.6, 0.7, 0.2]], dtype=torch.float64)
    s = torch.cat([s, torch.zeros(4, 5, dtype=torch.float64)])
    labels = torch.tensor([0, 1, 2, 3, 4])
    term = CosineMarginLoss(alpha=0.1, beta=0.5, seed=0)
    counts = torch.zeros(5)
    trials = 6000
    for _ in range(trials):
        anchor, partner, _ = term.sample_pairs(s, labels)
        counts[partner[anchor == 0]] += 1
    expected = torch.tensor([0, 0.1, 0.2, 0.3, 0]) / 0.6
    assert counts[0] == 0 and counts[4] == 0
    assert torch.allclose(counts / trials, expected.float(), atol=0.02)


def test_margin_loss_equals_eq2_on_the_drawn_pairs_with_gradient():
    x, labels = batch(4, n=16, classes=3)
    term = CosineMarginLoss(alpha=0.1, beta=0.5, seed=7).double()
    x1 = x.clone().requires_grad_(True)
    loss = term(x1, labels)
    loss.backward()
    replay = CosineMarginLoss(alpha=0.1, beta=0.5, seed=7).double()
    x2 = x.clone().requires_grad_(True)
    xn = torch.nn.functional.normalize(x2, dim=1)
    anchor, partner, y = replay.sample_pairs((xn @ xn.T).detach(), labels)
    beta = replay.beta
    losses = [torch.relu(0.1 - yy * (xn[a] @ xn[p] - beta)) for a, p, yy in zip(anchor, partner, y)]
    naive = torch.stack(losses).mean()
    naive.backward()
    assert torch.allclose(loss, naive)
    assert torch.allclose(x1.grad, x2.grad)
    assert torch.allclose(term.beta.grad, replay.beta.grad)


def test_margin_loss_with_nothing_to_draw_is_zero():
    term = CosineMarginLoss()
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]], requires_grad=True)
    loss = term(x, torch.tensor([0, 0, 1, 1]))  # positives at S=1 >= beta+alpha, negatives at -1
    loss.backward()
    assert loss.item() == 0.0


def test_loss_set_total_is_the_weighted_sum_of_its_terms():
    from doppel.losses.loss_set import LossSet

    terms = {"l2": {"_target_": "doppel.losses.regularizers.L2Reg", "weight": 0.5}}
    regularizer = {"sec": {"_target_": "doppel.losses.regularizers.SphericalEmbeddingConstraint", "weight": 2.0}}
    loss_set = LossSet(terms, embedding_dim=2, num_classes=2, regularizer=regularizer)
    embeddings = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1
    total, logs, _ = loss_set(embeddings, torch.tensor([0, 1]))
    # L2-reg: (25 + 1) / 2 = 13; SEC: mu = 3, ((5 - 3)^2 + (1 - 3)^2) / 2 = 4; total 0.5 * 13 + 2 * 4
    assert logs["loss/l2"].item() == pytest.approx(13.0) and logs["loss/sec"].item() == pytest.approx(4.0)
    assert total.item() == pytest.approx(14.5)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf"), "heavy"])
def test_loss_set_refuses_weights_that_cannot_be_meant(weight):
    from doppel.losses.loss_set import LossSet

    terms = {"l2s": {"_target_": "doppel.losses.prototype.L2Softmax", "weight": weight}}
    with pytest.raises(ValueError, match=r"loss.terms.l2s.weight=.* must be a finite number >= 0"):
        LossSet(terms, embedding_dim=4, num_classes=3)


def test_a_term_may_declare_that_it_takes_negative_weights(monkeypatch):
    from doppel.losses.loss_set import LossSet
    from doppel.losses.regularizers import L2Reg

    monkeypatch.setattr(L2Reg, "allows_negative_weight", True, raising=False)
    loss_set = LossSet({"l2": {"_target_": "doppel.losses.regularizers.L2Reg", "weight": -1.0}}, 2, 2)
    assert loss_set(torch.tensor([[3.0, 4.0]]), torch.tensor([0]))[0].item() == pytest.approx(-25.0)
