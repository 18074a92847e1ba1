import pytest
import torch

from doppel.sampling.doppelganger import EMPTY, DoppelgangerTable, TableUpdate


def naive_proposals(logits, labels, reduction, k):
    """Sec. 3.2 by loops: per class in the batch, its k best other classes."""
    out = {}
    for cls in sorted(set(labels.tolist())):
        rows = [i for i in range(len(labels)) if labels[i] == cls]
        scores = {}
        for c in range(logits.shape[1]):
            if c == cls:
                continue
            values = [logits[i, c].item() for i in rows]
            scores[c] = max(values) if reduction == "max" else sum(values) / len(values)
        out[cls] = sorted(scores, key=lambda c: -scores[c])[:k]
    return out


@pytest.mark.parametrize("reduction", ["max", "mean"])
@pytest.mark.parametrize("k", [1, 3])
def test_proposals_match_naive_loop(reduction, k):
    generator = torch.Generator().manual_seed(0)
    for trial in range(5):
        logits = torch.randn(24, 17, generator=generator)
        labels = torch.randint(0, 17, (24,), generator=generator)
        # make the true class often the top score, as it is in training
        logits[torch.arange(24), labels] += 2.0 * (trial % 2)
        table = DoppelgangerTable(17, top_k=k, reduction=reduction)
        before = logits.clone()
        update = table.propose(logits, labels)
        assert torch.equal(logits, before)  # masking the targets is undone
        expected = naive_proposals(logits, labels, reduction, k)
        if reduction == "max":  # one proposal per row, its own k best other classes; apply() keeps the best
            rows = [sorted((c for c in range(17) if c != labels[i]), key=lambda c: -logits[i, c].item())[:k]
                    for i in range(24)]
            assert update.classes.tolist() == labels.tolist() and update.candidates.tolist() == rows
        else:
            got = {c: cands for c, cands in zip(update.classes.tolist(), update.candidates.tolist())}
            assert got == expected
        table.apply(update)
        for cls, cands in expected.items():
            assert table.table[cls].tolist() == cands
        untouched = sorted(set(range(17)) - set(expected))
        assert (table.table[untouched] == EMPTY).all()


def test_apply_resolves_duplicate_classes_by_highest_score():
    table = DoppelgangerTable(5)
    update = TableUpdate(
        classes=torch.tensor([2, 2, 3, -1, 2]),
        candidates=torch.tensor([[0], [4], [1], [-1], [3]]),
        scores=torch.tensor([[0.5], [0.9], [0.1], [float("-inf")], [0.7]]),
    )
    table.apply(update)
    assert table.table[:, 0].tolist() == [EMPTY, EMPTY, 4, 1, EMPTY]


def test_gathered_updates_give_the_same_table_in_any_order():
    generator = torch.Generator().manual_seed(1)
    updates = []
    for _ in range(3):  # three "ranks"
        logits = torch.randn(8, 10, generator=generator)
        labels = torch.randint(0, 10, (8,), generator=generator)
        updates.append(DoppelgangerTable(10).propose(logits, labels, pad_to=8))
    a, b = DoppelgangerTable(10), DoppelgangerTable(10)
    a.apply(TableUpdate.cat(updates))
    b.apply(TableUpdate.cat(updates[::-1]))
    assert torch.equal(a.table, b.table)
    # and it equals proposing from all rows at once with the max reduction
    assert len(updates[0].classes) == 8


def test_state_dict_round_trip_and_shape_check():
    table = DoppelgangerTable(6, top_k=2)
    table.table[1] = torch.tensor([3, 4])
    other = DoppelgangerTable(6, top_k=2)
    other.load_state_dict(table.state_dict())
    assert torch.equal(other.table, table.table)
    with pytest.raises(ValueError, match="top_k"):
        DoppelgangerTable(7, top_k=2).load_state_dict(table.state_dict())


def test_hubs_and_filled_fraction():
    table = DoppelgangerTable(4)
    table.table[:, 0] = torch.tensor([2, 2, 1, EMPTY])
    assert table.filled_fraction() == 0.75
    assert table.hubs(2) == [(2, 2), (1, 1)]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="doppel.reduction"):
        DoppelgangerTable(5, reduction="median")
    with pytest.raises(ValueError, match="doppel.top_k"):
        DoppelgangerTable(5, top_k=5)


@pytest.mark.parametrize("k", [1, 3])
def test_processes_merging_their_proposals_equal_one_process_on_the_global_batch(k):
    # Two "ranks" each see half of a global batch; classes recur across the halves (as under DDP).
    generator = torch.Generator().manual_seed(7)
    for _ in range(20):
        logits = torch.randn(16, 9, generator=generator)
        labels = torch.randint(0, 9, (16,), generator=generator)
        one = DoppelgangerTable(9, top_k=k)
        one.apply(one.propose(logits, labels))
        split = DoppelgangerTable(9, top_k=k)
        halves = [split.propose(logits[part], labels[part], pad_to=8) for part in (slice(0, 8), slice(8, 16))]
        split.apply(TableUpdate.cat(halves))
        assert torch.equal(split.table, one.table)
        assert torch.equal(split.table, torch.tensor(
            [naive_proposals(logits, labels, "max", k).get(c, [EMPTY] * k) for c in range(9)]))


def test_apply_replaces_a_proposed_class_row_and_keeps_the_others():
    table = DoppelgangerTable(6, top_k=2)
    table.table[:] = torch.tensor([[1, 2], [0, 2], [0, 1], [4, 5], [3, 5], [3, 4]])
    update = TableUpdate(torch.tensor([3, 3]), torch.tensor([[0, 1], [1, 2]]),
                         torch.tensor([[0.9, 0.2], [0.5, 0.4]]))
    table.apply(update)
    # class 3: candidates 0 (0.9), 1 (best of 0.2 and 0.5), 2 (0.4): the top two are 0 and 1
    assert table.table[3].tolist() == [0, 1]
    assert table.table[[0, 1, 2, 4, 5]].tolist() == [[1, 2], [0, 2], [0, 1], [3, 5], [3, 4]]
