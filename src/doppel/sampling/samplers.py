"""Batch samplers: random identities, or random identities chained with their doppelgangers.

Sec. 3.1 of the Doppelganger paper: the per-class example counts are drawn first (from a range, e.g.
2-8) until the batch of size M is full, which fixes N_c; then N_r classes are drawn at random and
class i >= N_r is Doppelganger(class i - N_r), falling back to a random class when it has no
doppelganger yet or the doppelganger is already in the batch.

Data parallelism is exact: a step's global batch is world_size x ``batch_size`` images, drawn as
world_size sub-batches, one after the other, from one stream that every process follows (seeded from
(seed, epoch)); each process trains on its own sub-batch, so a doppelganger chain stays in one process
(whose exemplar loss then sees both classes), and one epoch is ceil(images / (world_size x batch_size))
steps: the data once in total, not once per process.

Samplers own their randomness: each epoch is one ``torch.Generator`` stream seeded from (seed, epoch),
from which :meth:`IdentityBatchSampler.draw` takes one step's batch at a time. Where an epoch stands
(the generator, the batches drawn ahead of training) is kept by
:class:`~doppel.sampling.resumable.ResumableBatches`, so that a run resumed from any step draws the
batches the interrupted one would have; a sampler's own state is its epoch and counts.

A sampler is built from a :class:`SamplerContext` (what the run knows) and its config settings; what it
needs beyond the labels it declares as class attributes (``uses_table``). ``sampler=auto`` is the
function :func:`auto_sampler`, which picks a sampler class for the loss.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Sampler

from doppel.sampling.doppelganger import DoppelgangerTable
from doppel.sampling.weighted_draw import WeightedDraw
from doppel.seeding import stable_seed


@dataclass
class SamplerContext:
    """What the run gives a sampler: the training labels (classes 0..C-1), the seed, this process's rank
    among ``world_size``, and the doppelganger table when the sampler's class has ``uses_table``."""

    labels: Sequence[int] | torch.Tensor
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    table: DoppelgangerTable | None = None


class IdentityBatchSampler(Sampler[list[int]]):
    """Random classes, each with a random number of examples, until the batch holds ``batch_size``.

    ``examples_per_class`` is an int (fixed count) or a ``[low, high]`` range (inclusive). A class with
    fewer images than its count repeats them (each repeat is augmented anew); the last class of a batch
    is cut to fit, but with ``low >= 2`` never to one image (it would have no positive pair for an
    exemplar loss): a count that would leave one slot takes it (or, at ``high``, leaves two).
    ``batch_size`` is per process. ``batches_per_epoch`` (steps) defaults to
    ceil(number of images / (world_size x batch_size)).
    """

    uses_table: ClassVar[bool] = False  # True: the run must mine the doppelganger table for it

    def __init__(
        self,
        context: SamplerContext,
        batch_size: int,
        examples_per_class: int | Sequence[int] = (2, 8),
        batches_per_epoch: int | None = None,
    ) -> None:
        IdentityBatchSampler.check_settings(batch_size, examples_per_class, batches_per_epoch)
        if not 0 <= context.rank < context.world_size:
            raise ValueError(f"rank {context.rank} is not one of world_size={context.world_size} processes.")
        labels = torch.as_tensor(context.labels, dtype=torch.long)
        low, high = _count_range(examples_per_class)
        self.num_classes = int(labels.max()) + 1
        # Flat arrays, not a tensor per class: at a million classes the views alone would take 600 MB.
        # The images of class c: image_order[start:start + n]; None when the labels come class by class (the
        # split's training labels do), where that order is the identity and would cost 8 bytes an image.
        sorted_already = bool((labels[1:] >= labels[:-1]).all())
        self.image_order = None if sorted_already else torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=self.num_classes)
        self.class_start = (torch.cumsum(counts, 0) - counts).numpy()  # arrays: 2M Python ints would be 130 MB
        self.class_count = counts.numpy()
        empty = torch.nonzero(counts == 0).flatten()[:5].tolist()
        if empty:
            raise ValueError(f"classes {empty} have no training images; relabel classes to 0..C-1 without gaps.")
        few = counts < low
        if few.any():
            warnings.warn(f"sampler.examples_per_class={examples_per_class}: {int(few.sum())} of {self.num_classes} "
                          f"classes have fewer than {low} training images (the fewest: {int(counts.min())}), so their "
                          "images repeat within a batch (each copy augmented anew); lower examples_per_class to "
                          "avoid repeats.", stacklevel=2)
        max_classes = math.ceil(batch_size / low)
        if max_classes > self.num_classes:
            raise ValueError(
                f"a batch of {batch_size} with as few as {low} examples per class needs up to {max_classes} "
                f"classes but the data has {self.num_classes}: lower sampler.batch_size or raise "
                f"sampler.examples_per_class."
            )
        self.batch_size = batch_size
        self.count_range = (low, high)
        self.seed, self.rank, self.world_size = context.seed, context.rank, context.world_size
        self.batches_per_epoch = batches_per_epoch or math.ceil(len(labels) / (self.world_size * batch_size))
        self.epoch = 0

    @classmethod
    def check_settings(cls, batch_size: int, examples_per_class: int | Sequence[int] = (2, 8),
                       batches_per_epoch: int | None = None) -> None:
        """The checks that need no data (run on the config before anything is loaded)."""
        if not isinstance(batch_size, int) or batch_size < 2:
            raise ValueError(f"sampler.batch_size={batch_size} must be an integer of at least 2.")
        _count_range(examples_per_class)
        if batches_per_epoch is not None and (not isinstance(batches_per_epoch, int) or batches_per_epoch < 1):
            raise ValueError(f"sampler.batches_per_epoch={batches_per_epoch} must be a positive integer or null.")

    # -- state -------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def state_dict(self) -> dict:
        """The epoch and seed (and a subclass's counts); the position within the epoch is
        :class:`~doppel.sampling.resumable.ResumableBatches`'."""
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.seed = state["epoch"], state["seed"]

    def __len__(self) -> int:
        return self.batches_per_epoch

    # -- sampling ----------------------------------------------------------------------------
    def stream(self) -> torch.Generator:
        """The epoch's generator at its start: one reproducible stream per (seed, epoch), which every
        process follows (the trailing 0 keeps the stream a single process drew before data parallelism
        was exact)."""
        return torch.Generator().manual_seed(stable_seed(self.seed, self.epoch, 0))

    def __iter__(self) -> Iterator[list[int]]:
        """One epoch from its start (training iterates through ResumableBatches, which can resume one)."""
        generator = self.stream()
        self.begin_epoch(None)
        for _ in range(self.batches_per_epoch):
            yield self.draw(generator)

    def draw(self, generator: torch.Generator) -> list[int]:
        """This process's batch of the next step: every process's sub-batch is drawn in turn from the one
        stream, and this process keeps its own."""
        for rank in range(self.world_size):
            counts = self._draw_counts(generator)
            classes = self._choose_classes(len(counts), generator)
            self._drew(classes)
            drawn = self._fill(classes, counts, generator)
            if rank == self.rank:
                batch = drawn
        return batch

    def epoch_state(self) -> dict:
        """What a subclass keeps of the epoch so far (saved with the position)."""
        return {}

    def begin_epoch(self, position: dict | None) -> None:
        """A new epoch starts (``position`` None) or a saved one resumes."""

    def _drew(self, classes: list[int]) -> None:
        """The classes of a sub-batch just drawn (of any process)."""

    def _draw_counts(self, generator: torch.Generator) -> list[int]:
        low, high = self.count_range
        counts, total = [], 0
        while total < self.batch_size:
            count = int(torch.randint(low, high + 1, (1,), generator=generator))
            count = min(count, self.batch_size - total)
            if low >= 2 and self.batch_size - total - count == 1:
                count = count + 1 if count < high or count == 2 else count - 1  # fixed 2: 3, the only way
            counts.append(count)
            total += count
        return counts

    def _choose_classes(self, n_classes: int, generator: torch.Generator) -> list[int]:
        return self._random_classes(n_classes, set(), generator)

    def _random_classes(self, n: int, taken: set[int], generator: torch.Generator) -> list[int]:
        """``n`` distinct random classes not in ``taken`` (which grows by them)."""
        if len(taken) + n > self.num_classes // 2:  # dense: a permutation is cheaper than rejection
            free = [c for c in torch.randperm(self.num_classes, generator=generator).tolist() if c not in taken]
            chosen = free[:n]
        else:  # sparse (e.g. 27 of 100,000 classes): rejection, no O(num_classes) work per batch
            chosen = []
            while len(chosen) < n:
                for c in torch.randint(self.num_classes, (2 * n,), generator=generator).tolist():
                    if c not in taken and len(chosen) < n:
                        taken.add(c)
                        chosen.append(c)
            return chosen
        taken.update(chosen)
        return chosen

    def _fill(self, classes: list[int], counts: list[int], generator: torch.Generator) -> list[int]:
        batch = []
        for cls, count in zip(classes, counts):
            start = int(self.class_start[cls])
            end = start + int(self.class_count[cls])
            images = self.image_order[start:end] if self.image_order is not None else torch.arange(start, end)
            picks = torch.cat([torch.randperm(len(images), generator=generator)
                               for _ in range(math.ceil(count / len(images)))])[:count]
            batch.extend(images[picks].tolist())
        return batch


class DoppelgangerBatchSampler(IdentityBatchSampler):
    """Sec. 3.1: N_r random classes, then each class the doppelganger of the one N_r places before.

    ``random_ratio`` is N_r / N_c, a number or a fraction such as ``"9/27"`` (Table 5 sweeps it; 1.0 is
    random sampling with the table still mined). N_r = max(1, round(random_ratio * N_c)). With
    ``doppel.top_k > 1`` the best of the class's doppelgangers that is not yet in the batch is taken
    before falling back to a random class. For the first ``warmup_epochs`` epochs every class is random
    (the table is mined all along; not in the paper: an ablation). Under data parallelism each process's
    sub-batch is drawn this way, so chains never cross processes.
    """

    uses_table = True

    def __init__(self, context: SamplerContext, batch_size: int, random_ratio: float | str = 1 / 3,
                 warmup_epochs: int = 0, **kwargs) -> None:
        random_ratio = parse_random_ratio(random_ratio)
        _check_warmup(warmup_epochs)
        super().__init__(context, batch_size, **kwargs)
        self.warmup_epochs = warmup_epochs
        table = context.table
        if table is None:
            raise ValueError(f"{type(self).__name__} samples from the doppelganger table: the run must mine one.")
        if table.num_classes != self.num_classes:
            raise ValueError(f"doppelganger table has {table.num_classes} classes, the data {self.num_classes}.")
        self.table = table  # read for doppelgangers; told where each batch class came from (count_draw)
        self.random_ratio = random_ratio

    @classmethod
    def check_settings(cls, batch_size: int, random_ratio: float | str = 1 / 3, warmup_epochs: int = 0,
                       **settings) -> None:
        parse_random_ratio(random_ratio)
        _check_warmup(warmup_epochs)
        super().check_settings(batch_size, **settings)

    def n_random(self, n_classes: int) -> int:
        if self.epoch < self.warmup_epochs:
            return n_classes
        return max(1, min(n_classes, round(self.random_ratio * n_classes)))

    def _admission(self) -> Callable[[int], bool] | None:
        """Which of a class's doppelgangers not yet in the batch may join it (None: any of them)."""
        return None

    def _choose_classes(self, n_classes: int, generator: torch.Generator) -> list[int]:
        n_random = self.n_random(n_classes)
        in_batch: set[int] = set()
        chosen = self._random_classes(n_random, in_batch, generator)
        self.table.count_draw("random", n_random)
        admits = self._admission()
        for i in range(n_random, n_classes):
            known = self.table.doppelgangers(chosen[i - n_random])
            fresh = [c for c in known if c not in in_batch]
            allowed = fresh if admits is None else [c for c in fresh if admits(c)]
            if allowed:
                cls = allowed[0]
                self.table.count_draw("table")
            else:  # "capped": fresh doppelgangers, none admitted
                self.table.count_draw("capped" if fresh else "fallback_taken" if known else "fallback_empty")
                cls = self._random_classes(1, in_batch, generator)[0]
            chosen.append(cls)
            in_batch.add(cls)
        return chosen


class BalancedDoppelgangerBatchSampler(DoppelgangerBatchSampler):
    """Doppelganger sampling that keeps every class's exposure near the mean (``sampler=doppel_balanced``).

    The paper's rule lets hubs (the doppelganger of many classes) into most batches while classes that
    are nobody's doppelganger get only the random slots. Here, within an epoch: a doppelganger joins a
    batch only while the number of batches it has been in is below ``cap`` times the mean over classes
    (at least 1); otherwise the chain goes on with a random class. The random classes are drawn with
    probability proportional to 1 / (1 + batches the class has been in), so starved classes catch up.
    Counts cover every process's sub-batch and are kept with the resume position.
    """

    def __init__(self, context: SamplerContext, batch_size: int, random_ratio: float | str = 1 / 3,
                 cap: float = 2.0, **kwargs) -> None:
        self.check_cap(cap)
        super().__init__(context, batch_size, random_ratio, **kwargs)
        self.cap = float(cap)
        self.begin_epoch(None)

    @classmethod
    def check_settings(cls, batch_size: int, random_ratio: float | str = 1 / 3, cap: float = 2.0,
                       **settings) -> None:
        cls.check_cap(cap)
        super().check_settings(batch_size, random_ratio, **settings)

    @staticmethod
    def check_cap(cap: float) -> None:
        if not isinstance(cap, (int, float)) or not cap >= 1:
            raise ValueError(f"sampler.cap={cap} must be a number >= 1 (a class's batches over the mean).")

    def epoch_state(self) -> dict:
        return {"exposure": torch.from_numpy(self.exposure.copy())}

    def begin_epoch(self, position: dict | None) -> None:
        exposure = position["exposure"].numpy() if position else np.zeros(self.num_classes, dtype=np.int64)
        self.exposure = exposure.astype(np.int64)
        self.exposed = int(self.exposure.sum())
        self.weights = WeightedDraw(1.0 / (1.0 + self.exposure))

    def _drew(self, classes: list[int]) -> None:
        for cls in classes:  # O(log C) each: no pass over all the classes per batch
            self.exposure[cls] += 1
            self.weights.set(cls, 1.0 / (1.0 + self.exposure[cls]))
        self.exposed += len(classes)

    def _limit(self) -> float:
        return max(1.0, self.cap * self.exposed / self.num_classes)

    def _random_classes(self, n: int, taken: set[int], generator: torch.Generator) -> list[int]:
        chosen = self.weights.draw(n, taken, generator)
        taken.update(chosen)
        return chosen

    def _admission(self) -> Callable[[int], bool]:
        limit = self._limit()
        return lambda cls: bool(self.exposure[cls] < limit)


def auto_sampler(has_prototype: bool, batch_size: int, examples_per_class: int | Sequence[int] = (2, 8),
                 batches_per_epoch: int | None = None, random_ratio: float | str = 1 / 3,
                 warmup_epochs: int = 0) -> tuple[type[IdentityBatchSampler], dict[str, Any]]:
    """``sampler=auto``: (the sampler class, its settings) for the loss: doppelganger sampling when the loss
    has a prototype (classifier) term to mine from, random identity sampling otherwise (exemplar-only
    losses have no logits to mine), which takes no ``random_ratio`` / ``warmup_epochs``."""
    settings: dict[str, Any] = {"batch_size": batch_size, "examples_per_class": examples_per_class,
                                "batches_per_epoch": batches_per_epoch}
    if not has_prototype:
        return IdentityBatchSampler, settings
    return DoppelgangerBatchSampler, {**settings, "random_ratio": random_ratio, "warmup_epochs": warmup_epochs}


def _check_warmup(warmup_epochs: int) -> None:
    if not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(f"sampler.warmup_epochs={warmup_epochs} must be a non-negative integer (0: no warm-up).")


def parse_random_ratio(random_ratio: float | str) -> float:
    """``sampler.random_ratio`` as a float: a number or a fraction string such as ``"9/27"``, in (0, 1]."""
    try:
        ratio = float(Fraction(str(random_ratio).replace(" ", "")))
    except (ValueError, ZeroDivisionError):
        ratio = math.nan
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"sampler.random_ratio={random_ratio} must be a number or fraction (e.g. 9/27) in (0, 1].")
    return ratio


def _count_range(examples_per_class: int | Sequence[int]) -> tuple[int, int]:
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if whole(examples_per_class):
        low = high = examples_per_class
    else:
        values = list(examples_per_class) if isinstance(examples_per_class, Sequence) else [examples_per_class]
        if len(values) != 2 or not all(whole(v) for v in values):
            raise ValueError(f"sampler.examples_per_class={examples_per_class} must be a whole number of images per "
                             "class (e.g. 3) or a range of whole numbers [low, high] (e.g. [2, 8]).")
        low, high = values
    if not 1 <= low <= high:
        raise ValueError(f"sampler.examples_per_class={examples_per_class} needs 1 <= low <= high "
                         "(an int: that many of every class).")
    return low, high
