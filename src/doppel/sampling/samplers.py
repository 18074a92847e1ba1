"""Batch samplers: random identities, or random identities chained with their doppelgangers.

Sec. 3.1 of the Doppelganger paper: the per-class example counts are drawn first (from a range, e.g.
2-8) until the batch of size M is full, which fixes N_c; then N_r classes are drawn at random and
class i >= N_r is Doppelganger(class i - N_r), falling back to a random class when it has no
doppelganger yet or the doppelganger is already in the batch.

Samplers own their randomness: a ``torch.Generator`` seeded from (seed, epoch, rank). Their state holds
the epoch and, mid-epoch, the position in it (the generator after the last batch drawn and the batches
drawn ahead of training), so a run resumed from any step draws the batches the interrupted one would have.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from doppel.sampling.doppelganger import DoppelgangerTable
from doppel.seeding import stable_seed

# Batches a checkpoint can carry that were drawn ahead of training (DataLoader workers prefetch
# prefetch_factor x num_workers batches).
MAX_DRAWN_AHEAD = 256


class IdentityBatchSampler(Sampler[list[int]]):
    """Random classes, each with a random number of examples, until the batch holds ``batch_size``.

    ``examples_per_class`` is an int (fixed count) or a ``[low, high]`` range (inclusive). A class with
    fewer images than its count repeats them (each repeat is augmented anew); the last class of a batch
    is cut to fit. ``batches_per_epoch`` defaults to ceil(number of images / batch_size).
    """

    def __init__(
        self,
        labels: Sequence[int] | torch.Tensor,
        batch_size: int,
        examples_per_class: int | Sequence[int] = (2, 8),
        batches_per_epoch: int | None = None,
        seed: int = 0,
        rank: int = 0,
    ) -> None:
        IdentityBatchSampler.check_settings(batch_size, examples_per_class, batches_per_epoch)
        labels = torch.as_tensor(labels, dtype=torch.long)
        low, high = _count_range(examples_per_class)
        self.num_classes = int(labels.max()) + 1
        order = torch.argsort(labels, stable=True)
        counts = torch.bincount(labels, minlength=self.num_classes)
        self.class_images = list(torch.split(order, counts.tolist()))
        empty = [c for c, n in enumerate(counts.tolist()) if n == 0]
        if empty:
            raise ValueError(f"classes {empty[:5]} have no training images; relabel classes to 0..C-1 without gaps.")
        max_classes = math.ceil(batch_size / low)
        if max_classes > self.num_classes:
            raise ValueError(
                f"a batch of {batch_size} with as few as {low} examples per class needs up to {max_classes} "
                f"classes but the data has {self.num_classes}: lower sampler.batch_size or raise "
                f"sampler.examples_per_class."
            )
        self.batch_size = batch_size
        self.count_range = (low, high)
        self.batches_per_epoch = batches_per_epoch or math.ceil(len(labels) / batch_size)
        self.seed, self.rank = seed, rank
        self.epoch = 0
        # Position in the current epoch: the generator, how many batches it drew, the latest of them.
        self._stream: torch.Generator | None = None
        self._drawn = 0
        self._recent: deque[tuple[int, list[int]]] = deque(maxlen=MAX_DRAWN_AHEAD)
        self._resume: tuple[int, dict] | None = None

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

    @property
    def sampler(self) -> IdentityBatchSampler:
        # Lightning calls set_epoch on ``dataloader.batch_sampler.sampler``, not on the batch sampler.
        return self

    def state_dict(self, consumed: int | None = None) -> dict:
        """The epoch and, given ``consumed`` (batches of this epoch trained on so far), the position in it:
        the generator after the last batch drawn and the batches drawn but not yet trained on."""
        state: dict = {"epoch": self.epoch, "seed": self.seed}
        if consumed is not None and self._stream is not None:
            ahead = [batch for index, batch in self._recent if index >= consumed]
            if len(ahead) != self._drawn - consumed:
                raise RuntimeError(f"{self._drawn - consumed} batches were drawn ahead of training, more than the "
                                   f"{MAX_DRAWN_AHEAD} a checkpoint keeps: lower data.num_workers.")
            state["position"] = {"drawn": self._drawn, "generator": self._stream.get_state(), "ahead": ahead}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore; a saved position is taken up by the next iteration if it is of the same epoch."""
        self.epoch, self.seed = state["epoch"], state["seed"]
        self._resume = (state["epoch"], state["position"]) if "position" in state else None

    def __len__(self) -> int:
        return self.batches_per_epoch

    # -- sampling ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[list[int]]:
        resume, self._resume = self._resume, None
        generator = torch.Generator()
        if resume is not None and resume[0] == self.epoch:
            position = resume[1]
            generator.set_state(position["generator"])
            self._drawn, ahead = position["drawn"], [list(batch) for batch in position["ahead"]]
        else:
            # Distinct, reproducible streams for every (seed, epoch, rank).
            generator.manual_seed(stable_seed(self.seed, self.epoch, self.rank))
            self._drawn, ahead = 0, []
        self._stream = generator
        self._recent.clear()
        for index, batch in enumerate(ahead, start=self._drawn - len(ahead)):
            self._recent.append((index, batch))
            yield batch
        while self._drawn < self.batches_per_epoch:
            counts = self._draw_counts(generator)
            classes = self._choose_classes(len(counts), generator)
            batch = self._fill(classes, counts, generator)
            self._recent.append((self._drawn, batch))
            self._drawn += 1
            yield batch

    def _draw_counts(self, generator: torch.Generator) -> list[int]:
        low, high = self.count_range
        counts, total = [], 0
        while total < self.batch_size:
            count = int(torch.randint(low, high + 1, (1,), generator=generator))
            count = min(count, self.batch_size - total)
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
            images = self.class_images[cls]
            picks = torch.cat([torch.randperm(len(images), generator=generator)
                               for _ in range(math.ceil(count / len(images)))])[:count]
            batch.extend(images[picks].tolist())
        return batch


class DoppelgangerBatchSampler(IdentityBatchSampler):
    """Sec. 3.1: N_r random classes, then each class the doppelganger of the one N_r places before.

    ``random_ratio`` is N_r / N_c (Table 5 sweeps it; 1.0 is random sampling with the table still
    mined). N_r = max(1, round(random_ratio * N_c)). With ``doppel.top_k > 1`` the best of the class's
    doppelgangers that is not yet in the batch is taken before falling back to a random class.
    """

    def __init__(self, labels, batch_size: int, table: DoppelgangerTable, random_ratio: float = 1 / 3,
                 **kwargs) -> None:
        _check_random_ratio(random_ratio)
        super().__init__(labels, batch_size, **kwargs)
        if table.num_classes != self.num_classes:
            raise ValueError(f"doppelganger table has {table.num_classes} classes, the data {self.num_classes}.")
        self.table = table
        self.random_ratio = random_ratio
        # Where the classes of recent batches came from; read and reset by the mining callback.
        self.stats = {"random": 0, "table": 0, "fallback_empty": 0, "fallback_taken": 0}

    @classmethod
    def check_settings(cls, batch_size: int, random_ratio: float = 1 / 3, **settings) -> None:
        _check_random_ratio(random_ratio)
        super().check_settings(batch_size, **settings)

    def state_dict(self, consumed: int | None = None) -> dict:
        return {**super().state_dict(consumed), "stats": dict(self.stats)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.stats.update(state.get("stats", {}))

    def n_random(self, n_classes: int) -> int:
        return max(1, min(n_classes, round(self.random_ratio * n_classes)))

    def _choose_classes(self, n_classes: int, generator: torch.Generator) -> list[int]:
        n_random = self.n_random(n_classes)
        in_batch: set[int] = set()
        chosen = self._random_classes(n_random, in_batch, generator)
        self.stats["random"] += n_random
        for i in range(n_random, n_classes):
            known = self.table.doppelgangers(chosen[i - n_random])
            fresh = [c for c in known if c not in in_batch]
            if fresh:
                cls = fresh[0]
                self.stats["table"] += 1
            else:
                self.stats["fallback_taken" if known else "fallback_empty"] += 1
                cls = self._random_classes(1, in_batch, generator)[0]
            chosen.append(cls)
            in_batch.add(cls)
        return chosen


def _check_random_ratio(random_ratio: float) -> None:
    if not 0.0 < random_ratio <= 1.0:
        raise ValueError(f"sampler.random_ratio={random_ratio} must be in (0, 1].")


def _count_range(examples_per_class: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(examples_per_class, int):
        low = high = examples_per_class
    else:
        values = list(examples_per_class)
        if len(values) != 2:
            raise ValueError(f"sampler.examples_per_class={values} must be an int or [low, high].")
        low, high = int(values[0]), int(values[1])
    if not 1 <= low <= high:
        raise ValueError(f"sampler.examples_per_class={examples_per_class} needs 1 <= low <= high "
                         "(an int: that many of every class).")
    return low, high
