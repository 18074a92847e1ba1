"""Lightning callback that makes a resumed run the run it continues, bit for bit.

Lightning's checkpoint holds the weights, optimizer, schedule and loop counters. This callback adds,
for each process: the global RNGs (Python, NumPy, torch on the CPU and CUDA), every ``torch.Generator``
the model owns (augmentation, pair sampling) and the training sampler's position within the epoch (its
generator and the batches drawn ahead of training); and for the run: its config, the number of processes
and the planned optimizer steps, under ``checkpoint["doppel"]`` (:mod:`doppel.checkpoint` checks them).

On resume each process takes back its own streams: the sampler and generators before the first batch,
the global RNGs at the first batch itself (what runs in between, e.g. a DataLoader starting, must not
shift them). A run resumed on another number of processes takes back the model, optimizer, table and
schedule (a sharded classifier is saved whole and resharded, docs/distributed.md) but not the per-process
streams: it draws the rest of the epoch for its own process count, skipping the steps already trained.
When a learning-rate schedule is on, a resumed run must have the same planned steps (the schedule spans
them: keep the global batch, trainer.devices x sampler.batch_size); it is refused otherwise.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn

from doppel.checkpoint import FORMAT, STAMP
from doppel.seeding import named_generators
from doppel.serialization import CheckpointError


def global_rng_state() -> dict[str, Any]:
    version, keys, gauss = random.getstate()
    kind, mt, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [kind, torch.from_numpy(mt.astype(np.int64)), position, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_global_rng_state(state: dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, mt, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, mt.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


class ExactResume(pl.Callback):
    def __init__(self, config: dict[str, Any], num_classes: int | None = None) -> None:
        self.config = config  # the resolved run config, stamped into every checkpoint
        self.num_classes = num_classes  # the classes the run trains on, stamped too (resume checks the data)
        self._consumed = 0  # batches of the current epoch trained on
        self._epoch_done = False
        self._restore: dict[str, Any] | None = None
        self._rng: dict[str, Any] | None = None
        self._planned_steps: float | None = None
        self._saved_by = 1  # processes that wrote the checkpoint resumed from

    @staticmethod
    def _sampler(trainer: pl.Trainer) -> Any:
        loader = trainer.train_dataloader
        sampler = getattr(loader, "batch_sampler", None)
        return sampler if callable(getattr(sampler, "state_dict", None)) else None

    # -- progress ------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_done = False

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._consumed = batch_idx + 1
        if self._rng is not None:
            set_global_rng_state(self._rng)
            self._rng = None

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_done = True

    # -- saving --------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        sampler = self._sampler(trainer)
        local = {
            "rng": global_rng_state(),
            "generators": {name: g.get_state() for name, g in named_generators(pl_module).items()},
            # At an epoch end the next epoch starts afresh: only the epoch counter matters.
            "sampler": sampler.state_dict(None if self._epoch_done else self._consumed) if sampler else None,
        }
        if trainer.world_size > 1:  # every process saves; the first one writes all their streams
            processes: list[Any] = [None] * trainer.world_size
            torch.distributed.all_gather_object(processes, local)
        else:
            processes = [local]
        checkpoint[STAMP] = {"format": FORMAT, "config": self.config, "classes": self.num_classes,
                             "planned_steps": trainer.estimated_stepping_batches, "processes": processes}

    # -- resuming ------------------------------------------------------------------------------
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        stamp = checkpoint[STAMP]
        processes = stamp["processes"]
        self._saved_by = len(processes)
        if len(processes) != trainer.world_size:
            rank_zero_warn(
                f"resuming a run of {len(processes)} processes on {trainer.world_size}: the weights, optimizer, "
                "doppelganger table and schedule resume as saved; the random streams were each process's own and "
                "start anew, and the rest of the epoch is drawn for this number of processes (as many steps as "
                "were left). Keep trainer.devices x sampler.batch_size (the global batch) as it was.")
            self._restore = {"elsewhere": processes[0]["sampler"]}
        else:
            self._restore = processes[trainer.global_rank]
        self._planned_steps = stamp["planned_steps"]

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._planned_steps is None or not trainer.lr_scheduler_configs:
            return  # a new run, or nothing depends on the planned length
        planned = trainer.estimated_stepping_batches
        if planned != self._planned_steps:
            raise CheckpointError(
                f"the checkpoint's run was planned for {self._planned_steps} optimizer steps and this one for "
                f"{planned} (trainer.max_epochs, trainer.limit_train_batches, trainer.max_steps or the global "
                "batch, trainer.devices x sampler.batch_size, differ): its learning-rate schedule spans the "
                "planned steps, so a run resumes with its own length; to train longer, start a new run."
                + (f" It was saved by {self._saved_by} processes: give this run the same global batch."
                   if self._saved_by != trainer.world_size else ""))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restore is None:
            return
        restore, self._restore = self._restore, None
        if "elsewhere" in restore:  # another number of processes: the position only (see on_load_checkpoint)
            sampler = self._sampler(trainer)
            if sampler is not None and restore["elsewhere"] is not None:
                sampler.load_state_dict_elsewhere(restore["elsewhere"])
            return
        generators = named_generators(pl_module)
        if generators.keys() != restore["generators"].keys():
            raise CheckpointError(f"the checkpoint holds the random generators {sorted(restore['generators'])} "
                                  f"and this model {sorted(generators)}: it was made by another model.")
        for name, generator in generators.items():
            generator.set_state(restore["generators"][name])
        sampler = self._sampler(trainer)
        if sampler is not None and restore["sampler"] is not None:
            sampler.load_state_dict(restore["sampler"])
        self._rng = restore["rng"]
