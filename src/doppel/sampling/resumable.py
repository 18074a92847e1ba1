"""Where a training epoch stands, so that a run resumed from any step draws what the interrupted one would.

:class:`ResumableBatches` iterates a sampler's epoch (:meth:`IdentityBatchSampler.draw` from the epoch's
stream) and keeps the position: the generator after the last batch drawn, how many batches it drew, and
the latest of them. DataLoader workers draw ahead of training (``prefetch_factor x num_workers``
batches), so the state taken after ``consumed`` trained batches holds the batches drawn but not yet
trained on; a resumed epoch replays them first, then draws on from the saved generator.

:class:`KeyedBatches` adds a seed to every image of a batch: the per-image random transforms (crops)
draw from it, so they are fixed by (seed, epoch, rank, batch, slot) whichever worker decodes the image,
and a resumed run crops as the interrupted one would have.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from doppel.seeding import stable_seed

# Batches a checkpoint can carry that were drawn ahead of training.
MAX_DRAWN_AHEAD = 256


class ResumableBatches:
    """An identity sampler's epochs, resumable mid-epoch. ``set_epoch`` and the sampler's settings pass
    through (Lightning calls ``set_epoch`` on ``dataloader.batch_sampler.sampler``: this object)."""

    def __init__(self, sampler: Any) -> None:
        self.batches = sampler
        self._stream: torch.Generator | None = None
        self._drawn = 0  # batches of this epoch drawn so far
        self._current = -1  # index in the epoch of the batch yielded last
        self.recent: deque[tuple[int, list[int]]] = deque(maxlen=MAX_DRAWN_AHEAD)  # (index, batch)
        self._resume: tuple[int, dict] | None = None

    # the sampler's, for the loaders and the seeds
    seed = property(lambda self: self.batches.seed)
    epoch = property(lambda self: self.batches.epoch)
    rank = property(lambda self: self.batches.rank)

    @property
    def sampler(self) -> ResumableBatches:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def current_batch(self) -> int:
        """Index in the epoch of the batch yielded last (a resumed epoch first yields those drawn ahead)."""
        return self._current

    def __iter__(self) -> Iterator[list[int]]:
        resume, self._resume = self._resume, None
        if resume is not None and resume[0] == self.epoch and "skip" in resume[1]:
            # Another number of processes: this epoch's stream anew, the batches already trained on skipped.
            generator = self.batches.stream()
            self.batches.begin_epoch(None)
            for _ in range(resume[1]["skip"]):
                self.batches.draw(generator)
            self._drawn, ahead = resume[1]["skip"], []
        elif resume is not None and resume[0] == self.epoch:
            position = resume[1]
            generator = torch.Generator()
            generator.set_state(position["generator"])
            self._drawn, ahead = position["drawn"], [list(batch) for batch in position["ahead"]]
            self.batches.begin_epoch(position)
        else:
            generator = self.batches.stream()
            self._drawn, ahead = 0, []
            self.batches.begin_epoch(None)
        self._stream = generator
        self.recent.clear()
        for index, batch in enumerate(ahead, start=self._drawn - len(ahead)):
            self.recent.append((index, batch))
            self._current = index
            yield batch
        while self._drawn < len(self.batches):
            batch = self.batches.draw(generator)
            self.recent.append((self._drawn, batch))
            self._current = self._drawn
            self._drawn += 1
            yield batch

    def state_dict(self, consumed: int | None = None) -> dict:
        """The sampler's state and, given ``consumed`` (batches of this epoch trained on so far), the position
        in the epoch: the generator after the last batch drawn and the batches drawn but not yet trained on."""
        state = self.batches.state_dict()
        if consumed is not None and self._stream is not None:
            ahead = [batch for index, batch in self.recent if index >= consumed]
            if len(ahead) != self._drawn - consumed:
                raise RuntimeError(f"{self._drawn - consumed} batches were drawn ahead of training, more than the "
                                   f"{MAX_DRAWN_AHEAD} a checkpoint keeps: lower data.num_workers.")
            state["position"] = {"drawn": self._drawn, "generator": self._stream.get_state(), "ahead": ahead,
                                 **self.batches.epoch_state()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore; a saved position is taken up by the next iteration if it is of the same epoch."""
        self.batches.load_state_dict({k: v for k, v in state.items() if k != "position"})
        self._resume = (state["epoch"], state["position"]) if "position" in state else None

    def load_state_dict_elsewhere(self, state: dict) -> None:
        """Restore the state another number of processes saved: the epoch and seed; a saved position resumes
        by drawing this process count's stream of the epoch from its start and skipping as many batches
        (steps) as were trained on. The batches differ from the interrupted run's (its sub-batches were
        drawn for another number of processes); the epoch's step count is kept."""
        self.batches.load_state_dict({k: v for k, v in state.items() if k != "position"})
        position = state.get("position")
        trained = None if position is None else position["drawn"] - len(position["ahead"])
        self._resume = None if trained is None else (state["epoch"], {"skip": trained})


class KeyedBatches:
    """Batches of (image index, seed of that image's random transforms)."""

    def __init__(self, batches: ResumableBatches) -> None:
        self.sampler = batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        batches = self.sampler
        for batch in batches:
            base = stable_seed("image", batches.seed, batches.epoch, batches.rank, batches.current_batch)
            yield [(index, (base + slot) % 2**63) for slot, index in enumerate(batch)]

    def __len__(self) -> int:
        return len(self.sampler)

    def state_dict(self, consumed: int | None = None) -> dict:
        return self.sampler.state_dict(consumed)

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def load_state_dict_elsewhere(self, state: dict) -> None:
        self.sampler.load_state_dict_elsewhere(state)
