"""The LightningModule: images -> backbone -> embeddings -> loss terms; evaluation embeddings."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from doppel.data.transforms import PaperAugment
from doppel.evaluation.protocol import evaluate_protocol, mirror_embed
from doppel.evaluation.verification import verification_accuracy
from doppel.losses.loss_set import LossSet
from doppel.seeding import seed_for_rank


class DoppelModule(pl.LightningModule):
    def __init__(self, backbone: nn.Module, loss_set: LossSet, optimizer: Any, scheduler: Any | None = None,
                 augment: PaperAugment | None = None, views: int = 1,
                 verification: list[tuple[str, torch.Tensor]] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.loss_set = loss_set
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.augment = augment or nn.Identity()
        self.views = views  # > 1: each image is augmented this many times, views stacked (NT-Xent)
        self.last_labels: torch.Tensor | None = None
        # (name, issame) of each verification pack, evaluated from the evaluation loaders 1, 2, ...
        self.verification = verification or []
        self._eval_outputs: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self.final_metrics: dict[str, float] = {}
        self.val_step: int | None = None  # global step of the latest validation

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before a resumed run restores the streams it saved
            seed_for_rank(self, self.global_rank)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    # -- training ----------------------------------------------------------------------------
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        if self.views > 1:
            images = torch.cat([self.augment(images) for _ in range(self.views)])
            labels = labels.repeat(self.views)
        else:
            images = self.augment(images)
        embeddings = self.backbone(images)
        # Loss terms in float32 even under mixed precision: margins, scales of 64 and log-sum-exps.
        with torch.autocast(embeddings.device.type, enabled=False):
            loss, logs = self.loss_set(embeddings.float(), labels)
        self.last_labels = labels
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False,
                      prog_bar=False, batch_size=len(labels))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(labels))
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=len(labels))
        return loss

    # -- evaluation --------------------------------------------------------------------------
    def _eval_step(self, batch: tuple[torch.Tensor, ...], dataloader_idx: int = 0) -> None:
        images, *columns = batch
        self._eval_outputs.setdefault(dataloader_idx, []).append(
            (mirror_embed(self.backbone, images).float().cpu(), *(c.cpu() for c in columns)))

    def _eval_end(self, prefix: str) -> None:
        outputs, self._eval_outputs = self._eval_outputs, {}
        metrics: dict[str, float] = {}
        for loader, parts in sorted(outputs.items()):
            embeddings, *columns = (torch.cat(column) for column in zip(*parts))
            where = f"{prefix} embeddings of {self.verification[loader - 1][0]}" if loader else f"{prefix} embeddings"
            finite = torch.isfinite(embeddings).all(dim=1)
            if not finite.all():
                raise FloatingPointError(
                    f"{int((~finite).sum())} of {len(finite)} {where} are not finite: the network diverged (lower "
                    "optim.lr) or its weights overflow; no metrics are computed from them.")
            if loader == 0:
                metrics.update({f"{prefix}/{k}": v for k, v in evaluate_protocol(embeddings, *columns).items()})
            else:
                name, pairs = self.verification[loader - 1]
                metrics.update({f"{prefix}/{name}/{k}": v
                                for k, v in verification_accuracy(embeddings[columns[0].argsort()], pairs).items()})
        # Every rank evaluated the full sets: the numbers are identical, no reduction needed.
        self.log_dict(metrics, sync_dist=False, rank_zero_only=False)
        self.final_metrics.update(metrics)
        if prefix == "val":
            self.val_step = self.global_step

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        if self._eval_outputs:
            self._eval_end("val")

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for param in self.parameters():
            if param.requires_grad:
                # Scales, margins, biases, ARFA's a and norm parameters are not weight-decayed.
                (decay if param.dim() > 1 else no_decay).append(param)
        optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if self.scheduler_factory is None:
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer, T_max=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
