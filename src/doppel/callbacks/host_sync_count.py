"""Lightning callback that counts the host syncs of each training step on the CPU (:mod:`doppel.host_syncs`)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytorch_lightning as pl

from doppel.host_syncs import HostSyncCounter


class CountHostSyncs(pl.Callback):
    """Counts :class:`HostSyncCounter` calls in each training step, from ``on_train_batch_start`` to the
    end of the last callback's ``on_train_batch_end`` (it moves itself last): the step, the loss, the
    optimizer and what callbacks do with the step's outputs. ``per_step[i]``: the count of step ``i``
    (0-based); ``sites``: where they were made, over all steps. With ``folder``, each process writes them
    to ``<folder>/host_syncs_rank<r>.json`` when training ends."""

    def __init__(self, folder: str | None = None) -> None:
        self.folder = folder
        self.per_step: list[int] = []
        self.sites: Counter[str] = Counter()
        self._counter: HostSyncCounter | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        trainer.callbacks.remove(self)
        trainer.callbacks.append(self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._counter = HostSyncCounter()
        self._counter.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter is None:
            return
        self._counter.__exit__(None, None, None)
        self.per_step.append(self._counter.total)
        self.sites.update(self._counter.sites)
        self._counter = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.folder is not None:
            path = Path(self.folder) / f"host_syncs_rank{trainer.global_rank}.json"
            path.write_text(json.dumps({"per_step": self.per_step, "sites": dict(self.sites)}, indent=1))
