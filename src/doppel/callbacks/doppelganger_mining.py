"""Lightning callback that mines doppelgangers from the prototype loss's logits after every step."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from doppel.sampling.doppelganger import DoppelgangerTable, TableUpdate


def lookalike_share(first: torch.Tensor, lookalikes: list[set[int]]) -> tuple[float, float] | None:
    """Over classes with a doppelganger (``first`` >= 0) and a known look-alike: the share whose first
    doppelganger is a known look-alike, and the mean share of the other classes that are (a random pick's
    expected score). None when no class qualifies."""
    judged = [(cls, int(other)) for cls, other in enumerate(first.tolist()) if other >= 0 and lookalikes[cls]]
    if not judged:
        return None
    hits = sum(other in lookalikes[cls] for cls, other in judged)
    chance = sum(len(lookalikes[cls]) for cls, _ in judged) / (len(lookalikes) - 1)
    return hits / len(judged), chance / len(judged)


class DoppelgangerMining(pl.Callback):
    """Updates the shared :class:`DoppelgangerTable` (sec. 3.2) and logs how it evolves.

    Logged: ``doppel/table_filled`` (share of classes with a doppelganger), ``doppel/churn`` (share of
    classes whose first doppelganger changed during the epoch), ``doppel/from_table`` (share of batch
    classes the sampler took from the table) and ``doppel/hub_count`` (how many identities have the
    top hub as doppelganger); the top hubs are printed by name at each epoch's end. Where the data knows
    which classes look alike (``lookalikes``, per class), ``doppel/lookalike_share`` is the share of
    classes with a doppelganger and a known look-alike whose first doppelganger is one of them, and
    ``doppel/lookalike_chance`` what a random pick would score.
    """

    def __init__(self, table: DoppelgangerTable, class_names: list[str] | None = None, n_hubs: int = 5,
                 lookalikes: list[set[int]] | None = None) -> None:
        self.table = table
        self.class_names = class_names
        self.n_hubs = n_hubs
        self.lookalikes = lookalikes
        self._epoch_start: torch.Tensor | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1 and self.table.reduction != "max":
            raise ValueError(f"doppel.reduction={self.table.reduction!r} cannot be mined exactly by "
                             f"{trainer.world_size} processes (a class's mean needs all its logits in one place): "
                             "use doppel.reduction=max or one process.")

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self.table.first().clone()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        term = pl_module.loss_set.prototype_term
        if term is None or term.last_logits is None:
            raise RuntimeError("doppelganger mining needs a prototype loss term (e.g. l2s) in loss.terms.")
        labels = pl_module.last_labels  # those the loss saw: with loss.views > 1, each label once per view
        update = self.table.propose(term.last_logits, labels, pad_to=len(labels))
        if trainer.world_size > 1:
            # Every rank applies every rank's proposals in the same way: the tables stay identical.
            gathered = pl_module.all_gather({"classes": update.classes, "candidates": update.candidates,
                                             "scores": update.scores})
            update = TableUpdate(gathered["classes"].flatten(0, 1),
                                 gathered["candidates"].flatten(0, 1), gathered["scores"].flatten(0, 1))
        self.table.apply(update)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            self._check_ranks_agree(pl_module)
        first = self.table.first()
        metrics = {"doppel/table_filled": self.table.filled_fraction()}
        if self._epoch_start is not None:
            metrics["doppel/churn"] = (first != self._epoch_start).float().mean().item()
        sampler = getattr(trainer.datamodule, "train_sampler", None) if trainer.datamodule else None
        stats = getattr(sampler, "stats", None)
        if stats:
            drawn = sum(stats.values())
            metrics["doppel/from_table"] = stats["table"] / drawn if drawn else 0.0
            for key in stats:
                stats[key] = 0
        if self.lookalikes is not None:
            judged = lookalike_share(first, self.lookalikes)
            if judged is not None:
                metrics["doppel/lookalike_share"], metrics["doppel/lookalike_chance"] = judged
        hubs = self.table.hubs(self.n_hubs)
        metrics["doppel/hub_count"] = float(hubs[0][1]) if hubs else 0.0
        pl_module.log_dict(metrics, rank_zero_only=True)
        if hubs:
            names = ", ".join(f"{self._name(c)} ({k})" for c, k in hubs)
            rank_zero_info(f"epoch {trainer.current_epoch}: doppelganger hubs: {names}")

    def _check_ranks_agree(self, pl_module: pl.LightningModule) -> None:
        positions = torch.arange(1, self.table.table.numel() + 1, dtype=torch.float64)
        checksum = (self.table.table.flatten().to(torch.float64) * positions).sum()
        gathered = pl_module.all_gather(checksum.to(pl_module.device))
        if not torch.all(gathered == gathered[0]):
            raise RuntimeError("the doppelganger tables of the processes differ; updates must be all-gathered.")

    def _name(self, cls: int) -> str:
        return self.class_names[cls] if self.class_names else str(cls)

    def state_dict(self) -> dict[str, Any]:
        return {**self.table.state_dict(), "epoch_start": self._epoch_start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.table.load_state_dict(state_dict)
        self._epoch_start = state_dict.get("epoch_start")
