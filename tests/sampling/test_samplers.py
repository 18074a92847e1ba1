import math
from collections import Counter

import pytest
import torch
from omegaconf import OmegaConf

from doppel.sampling.doppelganger import DoppelgangerTable
from doppel.sampling.resumable import ResumableBatches
from doppel.sampling.samplers import (
    BalancedDoppelgangerBatchSampler,
    DoppelgangerBatchSampler,
    IdentityBatchSampler,
    SamplerContext,
)

LABELS = torch.arange(40).repeat_interleave(3)  # 40 classes x 3 images


def classes_in_order(batch, labels=LABELS):
    seen = []
    for index in batch:
        cls = int(labels[index])
        if not seen or seen[-1] != cls:
            seen.append(cls)
    return seen


@pytest.mark.parametrize("counts", [(2, 8), 3, (1, 1)])
def test_every_batch_has_exactly_batch_size_and_counts_in_range(counts):
    sampler = IdentityBatchSampler(SamplerContext(LABELS, seed=3), batch_size=30, examples_per_class=counts)
    low, high = (counts, counts) if isinstance(counts, int) else counts
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4  # ceil(120 / 30)
    for batch in batches:
        assert len(batch) == 30
        per_class = Counter(int(LABELS[i]) for i in batch)
        sizes = sorted(per_class.values())
        assert all(s <= high for s in sizes)
        assert sum(s < low for s in sizes) <= 1  # only the last class may be cut to fit
        # classes are contiguous blocks: each class appears once in the order
        assert len(classes_in_order(batch)) == len(per_class)


def test_repeats_only_when_count_exceeds_class_size():
    sampler = IdentityBatchSampler(SamplerContext(LABELS, seed=0), batch_size=24, examples_per_class=3)
    for batch in sampler:
        assert len(set(batch)) == 24  # 3 images per class: no repeats needed
    sampler = IdentityBatchSampler(SamplerContext(LABELS, seed=0), batch_size=24, examples_per_class=6)
    for batch in sampler:
        per_class = Counter(batch)
        assert set(per_class.values()) == {2}  # each of the 3 images twice


def test_stream_is_fixed_by_seed_and_epoch():
    def draw(seed=0, epoch=0):
        sampler = IdentityBatchSampler(SamplerContext(LABELS, seed=seed), 30)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert draw() == draw()
    assert draw(epoch=1) != draw()
    assert draw(seed=1) != draw()


@pytest.mark.parametrize("world_size", [2, 3])
def test_processes_split_each_global_batch_of_one_stream(world_size):
    """Process r's batch at step s is sub-batch s * world_size + r of the one stream a single process
    draws: together the processes draw the data once per epoch, each its own part, and the doppelganger
    chains of a sub-batch (tested on one process above) stay in that process."""
    table = DoppelgangerTable(40)
    table.table[:, 0] = torch.arange(40) ^ 1  # every class has a doppelganger
    steps = 3
    single = list(DoppelgangerBatchSampler(SamplerContext(LABELS, seed=7, table=table), 12,
                                           batches_per_epoch=steps * world_size))
    ranks = [list(DoppelgangerBatchSampler(SamplerContext(LABELS, seed=7, rank=r, world_size=world_size, table=table),
                                           12, batches_per_epoch=steps)) for r in range(world_size)]
    assert [ranks[r][s] for s in range(steps) for r in range(world_size)] == single
    default = IdentityBatchSampler(SamplerContext(LABELS, rank=1, world_size=world_size), 12)
    assert len(default) == math.ceil(len(LABELS) / (world_size * 12))
    with pytest.raises(ValueError, match="rank 2 is not one of world_size=2"):
        IdentityBatchSampler(SamplerContext(LABELS, rank=2, world_size=2), 12)
    restored = IdentityBatchSampler(SamplerContext(LABELS), 30)
    source = IdentityBatchSampler(SamplerContext(LABELS, seed=5), 30)
    source.set_epoch(7)
    restored.load_state_dict(source.state_dict())
    assert list(restored) == list(source)


def test_doppel_sampler_first_n_random_then_chains():
    table = DoppelgangerTable(40)
    # a chain 0 -> 1 -> 2 -> ... -> 39 -> 0: every class has a doppelganger not yet in the batch
    table.table[:, 0] = (torch.arange(40) + 1) % 40
    sampler = DoppelgangerBatchSampler(SamplerContext(LABELS, seed=1, table=table),
                                       27, random_ratio=1 / 3, examples_per_class=3)
    for batch in sampler:
        classes = classes_in_order(batch)
        assert len(classes) == 9
        n_random = sampler.n_random(9)
        assert n_random == 3
        for i in range(n_random, 9):
            expected = (classes[i - n_random] + 1) % 40
            if expected not in classes[:i]:
                assert classes[i] == expected
            else:
                assert classes[i] not in classes[:i]
    assert sampler.table.draws["random"] == 3 * len(sampler)


def test_fallback_when_no_doppelganger_yet():
    table = DoppelgangerTable(40)  # empty
    sampler = DoppelgangerBatchSampler(SamplerContext(LABELS, seed=2, table=table),
                                       27, random_ratio=1 / 3, examples_per_class=3)
    for batch in sampler:
        classes = classes_in_order(batch)
        assert len(set(classes)) == 9  # fallbacks are random classes not yet in the batch
    assert sampler.table.draws["table"] == 0
    assert sampler.table.draws["fallback_empty"] == 6 * len(sampler)


def test_fallback_when_doppelganger_already_in_batch():
    table = DoppelgangerTable(40)
    # pairs: 2c <-> 2c+1; a chain of length 3 from a random class hits its origin again
    partner = torch.arange(40) ^ 1
    table.table[:, 0] = partner
    sampler = DoppelgangerBatchSampler(SamplerContext(LABELS, seed=4, table=table),
                                       27, random_ratio=1 / 3, examples_per_class=3)
    for batch in sampler:
        classes = classes_in_order(batch)
        assert len(set(classes)) == 9
        for i in range(3, 6):  # first link: the partner unless it was drawn among the random ones
            origin = classes[i - 3]
            if int(partner[origin]) not in classes[:i]:
                assert classes[i] == int(partner[origin])
        for i in range(6, 9):  # second link points back to a class in the batch: random fallback
            assert int(partner[classes[i - 3]]) in classes[:i]
    assert sampler.table.draws["fallback_taken"] >= 3 * len(sampler)


def test_random_ratio_one_is_random_sampling():
    table = DoppelgangerTable(40)
    table.table[:, 0] = (torch.arange(40) + 1) % 40
    sampler = DoppelgangerBatchSampler(SamplerContext(LABELS, table=table), 27, random_ratio=1.0, examples_per_class=3)
    list(sampler)
    assert sampler.table.draws["table"] == 0


def test_impossible_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="sampler.batch_size"):
        IdentityBatchSampler(SamplerContext(torch.arange(5).repeat(2)), batch_size=40, examples_per_class=2)
    with pytest.raises(ValueError, match="examples_per_class"):
        IdentityBatchSampler(SamplerContext(LABELS), 30, examples_per_class=(5, 2))
    for bad in (0.0, "0/27", "28/27", "nine", "1/0"):
        with pytest.raises(ValueError, match="random_ratio"):
            DoppelgangerBatchSampler(SamplerContext(LABELS, table=DoppelgangerTable(40)), 30, random_ratio=bad)
    with pytest.raises(ValueError, match="no training images"):
        IdentityBatchSampler(SamplerContext(torch.tensor([0, 0, 2, 2])), 2)


def test_top_k_table_takes_the_best_doppelganger_not_in_the_batch():
    table = DoppelgangerTable(40, top_k=2)
    # first choice points back into a pair (2c <-> 2c+1), second choice is c + 20 (mod 40)
    table.table[:, 0] = torch.arange(40) ^ 1
    table.table[:, 1] = (torch.arange(40) + 20) % 40
    sampler = DoppelgangerBatchSampler(SamplerContext(LABELS, seed=5, table=table),
                                       9, random_ratio=1 / 3, examples_per_class=3)
    for batch in sampler:
        classes = classes_in_order(batch)  # 3 classes: 1 random, then two links
        first, second, third = classes
        assert second == first ^ 1 and third == (second + 20) % 40


def _consume(sampler, table, prefetch, stop=None, start=0):
    """Iterate like a DataLoader that keeps ``prefetch`` batches drawn ahead (it draws batch i + prefetch
    before handing out batch i), and mine after each batch trained on (the table changes as training
    goes). Returns the batches trained on: all, or the first ``stop``. ``start``: batches trained before."""
    def mine(step):
        table.table[step % 40, 0] = (7 * step) % 40  # a deterministic "mining" update

    ahead, trained = [], []
    for batch in sampler:
        ahead.append(batch)
        if len(ahead) <= prefetch:
            continue
        trained.append(ahead.pop(0))
        mine(start + len(trained))
        if stop is not None and len(trained) == stop:
            return trained
    for batch in ahead:
        if stop is not None and len(trained) == stop:
            break
        trained.append(batch)
        mine(start + len(trained))
    return trained


@pytest.mark.parametrize("kind", [DoppelgangerBatchSampler, BalancedDoppelgangerBatchSampler])
@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("stop", [1, 4, 9])
def test_position_state_resumes_mid_epoch_exactly(prefetch, stop, kind):
    def sampler(table):
        s = ResumableBatches(kind(SamplerContext(LABELS, seed=3, table=table), 12, examples_per_class=(2, 4),
                                  batches_per_epoch=10))
        s.set_epoch(2)
        return s

    uninterrupted = sampler(DoppelgangerTable(40))
    full = _consume(uninterrupted, uninterrupted.batches.table, prefetch)
    # the same run, interrupted after ``stop`` batches; the table is restored with the sampler, as in a checkpoint
    table = DoppelgangerTable(40)
    first = sampler(table)
    head = _consume(first, table, prefetch, stop)
    state = first.state_dict(consumed=stop)
    assert len(state["position"]["ahead"]) == min(prefetch, 10 - stop)
    resumed_table = DoppelgangerTable(40)
    resumed_table.load_state_dict(table.state_dict())
    resumed = ResumableBatches(kind(SamplerContext(LABELS, table=resumed_table), 12, examples_per_class=(2, 4),
                                    batches_per_epoch=10))
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    tail = _consume(resumed, resumed_table, prefetch, start=stop)
    assert head + tail == full
    assert resumed_table.draws == uninterrupted.batches.table.draws  # where the classes came from, counted once


def test_a_position_of_another_epoch_is_not_taken_up():
    source = ResumableBatches(IdentityBatchSampler(SamplerContext(LABELS, seed=1), 30))
    it = iter(source)
    next(it)
    state = source.state_dict(consumed=1)
    restored = ResumableBatches(IdentityBatchSampler(SamplerContext(LABELS), 30))
    restored.load_state_dict(state)
    restored.set_epoch(1)  # the checkpoint ended epoch 0: the next epoch starts afresh
    fresh = IdentityBatchSampler(SamplerContext(LABELS, seed=1), 30)
    fresh.set_epoch(1)
    assert list(restored) == list(fresh)


def test_stream_seed_is_sha256_of_seed_epoch_rank_not_python_hash(monkeypatch):
    import hashlib

    from doppel.seeding import stable_seed

    assert stable_seed(3, 1, 0) == int.from_bytes(hashlib.sha256(b"3:1:0").digest()[:8], "big") >> 1

    def no_hash(_):
        raise AssertionError("hash() decides a stream: its value may change between Python versions")

    import doppel.sampling.samplers as samplers

    monkeypatch.setattr(samplers, "hash", no_hash, raising=False)  # found before the builtin
    sampler = IdentityBatchSampler(SamplerContext(LABELS, seed=3), 30)
    sampler.set_epoch(1)
    drawn = list(sampler)
    expected = torch.Generator().manual_seed(stable_seed(3, 1, 0))
    assert int(torch.randint(2, 9, (1,), generator=expected)) == len(
        [i for i in drawn[0] if int(LABELS[i]) == int(LABELS[drawn[0][0]])])


def test_image_seeds_of_a_resumed_epoch_are_those_of_the_uninterrupted_one():
    """Per-image crop seeds are fixed by (seed, epoch, rank, batch, slot); batches drawn ahead before a stop
    are replayed first after a resume, with their own batch numbers."""
    from doppel.sampling.resumable import KeyedBatches

    def batches(seed):
        return ResumableBatches(IdentityBatchSampler(SamplerContext(LABELS, seed=seed), 12, batches_per_epoch=8))

    whole = list(KeyedBatches(batches(2)))
    source = batches(2)
    keyed = iter(KeyedBatches(source))
    seen = [next(keyed) for _ in range(5)]  # 5 drawn, 3 trained on: 2 drawn ahead (workers prefetching)
    restored = batches(2)
    restored.load_state_dict(source.state_dict(consumed=3))
    assert seen == whole[:5] and list(KeyedBatches(restored)) == whole[3:]
    assert len({seed for batch in whole for _, seed in batch}) == 8 * 12  # every slot its own seed


def test_random_ratio_may_be_written_as_table_5_writes_it():
    table = DoppelgangerTable(40)
    for written, n_random in (("9/27", 9), ("1/27", 1), ("2 / 27", 2), ("27/27", 27), (0.5, 14)):
        sampler = DoppelgangerBatchSampler(SamplerContext(LABELS, table=table), 27, random_ratio=written,
                                           examples_per_class=3)
        assert sampler.n_random(27) == n_random, written


def hub_table(num_classes: int) -> DoppelgangerTable:
    """Every class's doppelganger is class 0 (and class 0's is class 1): one hub."""
    table = DoppelgangerTable(num_classes)
    table.table[:, 0] = 0
    table.table[0, 0] = 1
    return table


def exposure_of(sampler, epochs=1):
    counts = torch.zeros(sampler.num_classes)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in sampler:
            counts[torch.tensor(sorted({int(LABELS[i]) for i in batch}))] += 1
    return counts


def test_balanced_sampler_caps_the_hub_that_the_papers_rule_lets_into_every_batch():
    context = SamplerContext(LABELS, seed=0, table=hub_table(40))
    paper = exposure_of(DoppelgangerBatchSampler(context, 27, examples_per_class=3, batches_per_epoch=30))
    balanced_sampler = BalancedDoppelgangerBatchSampler(context, 27, examples_per_class=3, batches_per_epoch=30,
                                                        cap=2.0)
    balanced = exposure_of(balanced_sampler)
    assert paper[0] == 30  # the hub is in every batch under the paper's rule
    # the hub joins as a doppelganger only below 2x the mean so far; one random draw may add one more
    assert balanced[0] <= 2.0 * balanced.mean() + 1
    assert balanced.std() / balanced.mean() < paper.std() / paper.mean()
    assert balanced_sampler.table.draws["capped"] > 0
    assert torch.equal(torch.from_numpy(balanced_sampler.exposure), balanced.long())  # its count: the batches' classes


def test_random_classes_are_drawn_inversely_to_their_exposure():
    labels = torch.arange(3).repeat_interleave(2)
    sampler = BalancedDoppelgangerBatchSampler(SamplerContext(labels, table=DoppelgangerTable(3)), 2,
                                               examples_per_class=2)
    sampler.begin_epoch({"exposure": torch.tensor([0, 3, 1])})  # as a resumed epoch restores it
    generator = torch.Generator().manual_seed(0)
    picks = Counter(sampler._random_classes(1, set(), generator)[0] for _ in range(20000))
    expected = torch.tensor([1, 1 / 4, 1 / 2]) / (1 + 1 / 4 + 1 / 2)  # 1 / (1 + exposure), normalised
    for cls in range(3):
        assert abs(picks[cls] / 20000 - float(expected[cls])) < 0.01
    assert sampler._random_classes(2, {0}, generator) in ([1, 2], [2, 1])  # never a class already taken


def test_balanced_sampler_refuses_a_cap_below_one():
    for cap in (0.5, "two"):
        with pytest.raises(ValueError, match="sampler.cap"):
            BalancedDoppelgangerBatchSampler(SamplerContext(LABELS, table=DoppelgangerTable(40)), 27, cap=cap)


@pytest.mark.parametrize("kind", [DoppelgangerBatchSampler, BalancedDoppelgangerBatchSampler])
def test_a_warm_up_samples_at_random_before_doppelgangers_join(kind):
    sampler = kind(SamplerContext(LABELS, seed=0, table=hub_table(40)), 27, examples_per_class=3,
                   batches_per_epoch=4, warmup_epochs=2)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        list(sampler)
        assert (sampler.table.draws["table"] > 0) == (epoch >= 2), epoch  # the hub table is used only after
        sampler.table.end_epoch()  # counts start again
    with pytest.raises(ValueError, match="sampler.warmup_epochs"):
        kind(SamplerContext(LABELS, table=DoppelgangerTable(40)), 27, warmup_epochs=-1)


@pytest.mark.parametrize("batch_size, examples_per_class", [(24, (2, 8)), (25, (2, 8)), (82, 3), (25, 2), (81, 3),
                                                             (17, (2, 4)), (40, (3, 5))])
def test_no_class_is_left_with_one_image_when_pairs_are_asked_for(batch_size, examples_per_class):
    """Counts fill the batch exactly, each in [2, high] (fixed 2 in an odd batch: one class of 3, the only
    way); the same draws as before wherever no single image was left (81 = 27 x 3 is unchanged)."""
    low, high = (examples_per_class, examples_per_class) if isinstance(examples_per_class, int) \
        else examples_per_class
    sampler = IdentityBatchSampler(SamplerContext(torch.arange(60).repeat_interleave(6), seed=0), batch_size,
                                   examples_per_class)
    generator = torch.Generator().manual_seed(0)
    drawn = [sampler._draw_counts(generator) for _ in range(300)]
    for counts in drawn:
        assert sum(counts) == batch_size and min(counts) >= 2, counts
        assert max(counts) <= (3 if high == 2 else high), counts
    if batch_size % low == 0 and low == high:
        assert all(counts == [low] * (batch_size // low) for counts in drawn)


def test_classes_too_small_for_the_examples_per_class_are_said_to_repeat():
    labels = torch.arange(20).repeat_interleave(24)  # data.max_groups=20 of 24 images each
    with pytest.warns(UserWarning, match=r"examples_per_class=32: 20 of 20 classes have fewer than 32 training "
                                         r"images \(the fewest: 24\), so their images repeat within a batch"):
        sampler = IdentityBatchSampler(SamplerContext(labels, seed=0), 512, examples_per_class=32)
    batch = next(iter(sampler))
    assert len(batch) > len(set(batch))  # the repeats the warning announced


@pytest.mark.parametrize("prefetch", [1, 2])
def test_the_mining_lag_is_workers_times_prefetch_factor_batches(prefetch, tmp_path):
    """What docs/data.md says of the lag: when the first batch is handed to training, the sampler has drawn
    num_workers x prefetch_factor more (their classes chosen from the table as it was then)."""
    from doppel.data.datamodule import IdentityDataModule
    from tests.conftest import write_emoji_npz

    module = IdentityDataModule(reader="doppel.data.readers.rendered_npz.read_rendered_npz",
                                path=str(write_emoji_npz(tmp_path / "e.npz")), num_workers=2,
                                prefetch_factor=prefetch)
    module.attach_sampler(OmegaConf.create({"_target_": "doppel.sampling.samplers.IdentityBatchSampler",
                                            "batch_size": 8, "examples_per_class": 2}), DoppelgangerTable(2), 0)
    loader = module.train_dataloader()
    next(iter(loader))
    assert module.train_batches._drawn == 1 + 2 * prefetch
    with pytest.raises(ValueError, match="data.prefetch_factor=0 must be a positive integer or null"):
        IdentityDataModule(reader="doppel.data.readers.rendered_npz.read_rendered_npz", prefetch_factor=0)


def test_labels_in_class_order_keep_no_image_order_and_draw_the_same_images():
    """The split's training labels come class by class: the sampler keeps no [N] order for them, and draws the
    same images as with the order the labels would sort to (the identity)."""
    shuffled = torch.randperm(len(LABELS), generator=torch.Generator().manual_seed(0))
    scattered = IdentityBatchSampler(SamplerContext(LABELS[shuffled], seed=3), batch_size=24)
    in_order = IdentityBatchSampler(SamplerContext(LABELS, seed=3), batch_size=24)
    assert in_order.image_order is None and scattered.image_order is not None
    # the same classes and counts either way; each image of `scattered` is the shuffled place of one of `in_order`
    rank_in_class = torch.argsort(torch.argsort(LABELS[shuffled], stable=True))
    for a, b in zip(in_order, scattered):
        assert a == rank_in_class[b].tolist()
