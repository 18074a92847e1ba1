"""Lightning callback that merges every training step's doppelganger proposals into the table."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from doppel.losses.sharding import gather_rows
from doppel.sampling.doppelganger import DoppelgangerTable, TableUpdate


class DoppelgangerMining(pl.Callback):
    """Applies the proposals each training step returns (``outputs["proposals"]``, made by the prototype
    term from the logits it computed, sec. 3.2) to the shared :class:`DoppelgangerTable`, and logs the
    table's epoch metrics (:meth:`DoppelgangerTable.end_epoch`); the top hubs are printed by name at
    each epoch's end. ``lookalikes`` (per class, where the data knows them) feeds
    ``doppel/lookalike_share``.

    With several processes every rank's proposals are all-gathered and every rank applies all of them in
    the same order, so the tables stay identical (checked at every epoch end). Processes that split the
    classes (``classifier.sharded``) propose for the same classes from disjoint columns: their proposals
    are merged row by row (:meth:`TableUpdate.merge_shards`) before the table is written.
    """

    def __init__(self, table: DoppelgangerTable, class_names: list[str] | None = None, n_hubs: int = 5,
                 lookalikes: list[set[int]] | None = None) -> None:
        self.table = table
        self.class_names = class_names
        self.n_hubs = n_hubs
        self.lookalikes = lookalikes

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        term = pl_module.loss_set.prototype_term
        if term is None:
            raise ValueError("doppelganger mining needs a prototype loss term (e.g. l2s) in loss.terms.")
        # Split batches: a class's mean needs logits from several processes; split classes: every rank
        # sees every row of the global batch, so its columns' means are exact.
        if trainer.world_size > 1 and self.table.reduction != "max" and not term.sharded:
            raise ValueError(f"doppel.reduction={self.table.reduction!r} cannot be mined exactly by "
                             f"{trainer.world_size} processes (a class's mean needs all its logits in one place): "
                             "use doppel.reduction=max, classifier.sharded=true or one process.")
        # Where the proposals are made, so applying them never waits (the module moves there after setup).
        self.table.to_(trainer.strategy.root_device)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.table.start_epoch()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        update: TableUpdate = outputs["proposals"]
        if trainer.world_size > 1:  # fixed shapes: no size exchange, so the step never waits for the device
            gathered = {name: gather_rows(rows).view(trainer.world_size, *rows.shape)
                        for name, rows in vars(update).items()}
            update = TableUpdate.gathered(**gathered, split_classes=pl_module.loss_set.prototype_term.split())
        self.table.apply(update)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            gathered = pl_module.all_gather(self.table.checksum().to(pl_module.device))
            if not torch.all(gathered == gathered[0]):
                raise RuntimeError("the doppelganger tables of the processes differ; updates must be all-gathered.")
        pl_module.log_dict(self.table.end_epoch(self.lookalikes), rank_zero_only=True)
        hubs = self.table.hubs(self.n_hubs)
        if hubs:
            names = ", ".join(f"{self._name(c)} ({k})" for c, k in hubs)
            rank_zero_info(f"epoch {trainer.current_epoch}: doppelganger hubs: {names}")

    def _name(self, cls: int) -> str:
        return self.class_names[cls] if self.class_names else str(cls)

    def state_dict(self) -> dict[str, Any]:
        return self.table.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.table.load_state_dict(state_dict)
