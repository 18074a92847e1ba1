"""Partial FC (classifier.sample_rate < 1): which columns a step scores and the loss over them, one process.
(Sharded with sampling: tests/losses/test_sharded.py.)"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from doppel.losses import prototype as P
from doppel.losses.loss_set import LossSet
from doppel.sampling.doppelganger import EMPTY, DoppelgangerTable

DIM, CLASSES = 5, 20


def sampled(term_name: str = "l2s", rate: float = 0.5, negatives: str = "uniform", seed: int = 0) -> P.PrototypeTerm:
    spec = {"l2s": {"_target_": "doppel.losses.prototype.L2Softmax"},
            "arcface": {"_target_": "doppel.losses.prototype.ArcFace", "scale": 8.0},
            "lsoftmax": {"_target_": "doppel.losses.prototype.LargeMarginSoftmax", "margin": 2}}[term_name]
    torch.manual_seed(3)
    loss_set = LossSet({term_name: spec}, DIM, CLASSES, classifier={"sample_rate": rate, "negatives": negatives},
                       seed=seed)
    return loss_set.prototype_term


@pytest.mark.parametrize("name", ["l2s", "arcface", "lsoftmax"])
def test_the_loss_is_the_softmax_over_the_sampled_columns_and_positives_are_always_kept(name):
    term = sampled(name, rate=0.4)
    full = sampled(name, rate=1.0)  # the same weights, every column
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        labels = torch.randint(CLASSES, (7,), generator=generator)
        x = torch.randn(7, DIM, generator=generator)
        loss, view = term.loss_and_logits(x, labels)
        columns = view.column_classes
        assert set(labels.tolist()) <= set(columns.tolist())  # every batch class is scored
        assert len(columns) == int(0.4 * CLASSES)  # arcface_torch's budget (7 rows: it holds their classes)
        assert torch.equal(columns, columns.sort().values)
        logits = full.loss_and_logits(x, labels)[1].logits.detach()  # the margin at the target, as sampled
        expected = F.cross_entropy(logits[:, columns], torch.searchsorted(columns, labels))
        assert torch.allclose(loss, expected, atol=1e-6)
        assert torch.equal(view.column_classes[view.targets], labels)  # each row's target is its class


def test_only_sampled_rows_get_a_gradient():
    term = sampled("l2s", rate=0.25)
    labels = torch.tensor([0, 0, 7, 19])
    loss, view = term.loss_and_logits(torch.randn(4, DIM), labels)
    loss.backward()
    touched = (term.classifier.weight.grad.abs().sum(1) > 0).nonzero().squeeze(1)
    assert set(touched.tolist()) <= set(view.column_classes.tolist()) and len(view.column_classes) == 5


def test_sample_rate_one_is_the_full_classifier_exactly():
    torch.manual_seed(3)
    plain = P.L2Softmax(DIM, CLASSES)
    term = sampled("l2s", rate=1.0)
    x, labels = torch.randn(6, DIM), torch.tensor([1, 1, 4, 9, 9, 13])
    a, b = plain(x, labels), term(x, labels)
    assert torch.equal(a, b)
    assert not hasattr(term, "generator")  # nothing drawn


def test_uniform_negatives_follow_arcface_torchs_rule_in_distribution():
    """With 3 positives among 20 classes and a budget of 10, every negative is in the sample with probability
    7 / 17, independently of its index (arcface_torch: uniform priorities, positives on top, top-k)."""
    term = sampled("l2s", rate=0.5)
    labels = torch.tensor([2, 2, 11, 17])
    counts: Counter = Counter()
    draws = 4000
    for _ in range(draws):
        counts.update(term.sample_columns(labels, labels, 0).tolist())
    assert all(counts[c] == draws for c in (2, 11, 17))
    for cls in set(range(CLASSES)) - {2, 11, 17}:
        assert abs(counts[cls] / draws - 7 / 17) < 0.035, cls  # 4.5 standard deviations
    assert sum(counts.values()) == 10 * draws


def test_more_positives_than_the_budget_stop_the_run_with_the_rate_that_fits():
    """arcface_torch widens the sample to the positives; a fixed width never waits for the device, so the
    excess is remembered on it and the next check names the sample rate that holds every positive."""
    term = sampled("l2s", rate=0.1)  # budget 2
    term.check_sample()  # nothing sampled yet
    labels = torch.tensor([5, 3, 8])
    assert len(term.sample_columns(labels, labels, 0)) == 2
    term.sample_columns(labels[:2], labels[:2], 0)  # a later step that fits does not clear it
    with pytest.raises(ValueError, match=r"a step had 3 classes of the batch among this process's 20 classes, more "
                                         r"than its sample of 2: raise classifier.sample_rate to at least 0.15"):
        term.check_sample()


def test_doppel_negatives_take_every_current_doppelganger_of_the_batch_first():
    table = DoppelgangerTable(CLASSES, top_k=2)
    table.table[:] = EMPTY
    table.table[2] = torch.tensor([6, 9])
    table.table[11] = torch.tensor([9, 15])
    table.table[4] = torch.tensor([0, 1])  # not a batch class: its doppelgangers are not preferred
    labels = torch.tensor([2, 11, 11])
    for rate, expect_all in ((0.5, True), (0.2, False)):  # budgets 10 and 4 (2 positives, 3 doppelgangers)
        term = sampled("l2s", rate=rate, negatives="doppel")
        term.table = table
        chosen = Counter()
        for _ in range(300):
            columns = term.sample_columns(labels, labels, 0).tolist()
            assert {2, 11} <= set(columns)
            if expect_all:
                assert {6, 9, 15} <= set(columns)
            else:  # the budget's 2 negatives are doppelgangers, each of the 3 in turn
                assert set(columns) - {2, 11} <= {6, 9, 15}
                chosen.update(set(columns) - {2, 11})
        if not expect_all:
            assert set(chosen) == {6, 9, 15}
    uniform = sampled("l2s", rate=0.2, negatives="uniform")
    uniform.table = table
    hits = sum({6, 9, 15} >= set(uniform.sample_columns(labels, labels, 0).tolist()) - {2, 11} for _ in range(300))
    assert hits < 100  # at random, both negatives are doppelgangers 3/153 of the time


def test_partial_fc_settings_are_checked():
    with pytest.raises(ValueError, match=r"classifier.sample_rate=0 must be a number in \(0, 1\]"):
        sampled(rate=0)
    with pytest.raises(ValueError, match="classifier.negatives='hard' is not one of"):
        sampled(negatives="hard")
    with pytest.raises(ValueError, match="classifier.sample_rate=0.5: the loss term CenterLoss cannot be split"):
        LossSet({"center": {"_target_": "doppel.losses.prototype.CenterLoss"}}, DIM, CLASSES,
                classifier={"sample_rate": 0.5})
