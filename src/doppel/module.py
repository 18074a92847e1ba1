"""The LightningModule: images -> backbone -> embeddings -> loss terms; evaluation only embeds, the
:class:`~doppel.evaluation.evaluator.Evaluator` scores."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from doppel.evaluation.evaluator import Evaluator
from doppel.losses.loss_set import LossSet
from doppel.seeding import seed_for_rank

# Evaluation metrics are computed once on process 0 and broadcast: syncing them would only repeat that.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/")


class DoppelModule(pl.LightningModule):
    def __init__(self, backbone: nn.Module, loss_set: LossSet, optimizer: Any, scheduler: Any | None = None,
                 augment: nn.Module | None = None, views: int = 1, evaluator: Evaluator | None = None,
                 decay_1d_params: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.loss_set = loss_set
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.augment = augment or nn.Identity()
        self.views = views  # > 1: each image is augmented this many times, views stacked (NT-Xent)
        self.decay_1d_params = decay_1d_params  # the paper: weight decay on every parameter
        self.last_labels: torch.Tensor | None = None
        self.last_embeddings: torch.Tensor | None = None  # the last step's, detached (for callbacks)
        self.evaluator = evaluator
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
        self.last_embeddings = embeddings.detach()
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False,
                      prog_bar=False, batch_size=len(labels))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(labels))
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=len(labels))
        return loss

    # -- evaluation --------------------------------------------------------------------------
    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int = 0) -> None:
        images, index = batch
        plain = self.backbone(images)
        flipped = self.backbone(images.flip(-1)) if self.evaluator.flips[dataloader_idx] else None
        self.evaluator.add(dataloader_idx, index, plain, flipped)

    def _eval_end(self, prefix: str) -> None:
        term = self.loss_set.prototype_term
        classify = None if term is None else (lambda e: term.class_scores(e.to(self.device)).float().cpu())
        vectors = None if term is None else (lambda: term.class_vectors().detach().float().cpu())
        metrics = {f"{prefix}/{k}": v for k, v in self.evaluator.compute(classify, prefix, vectors).items()}
        # Computed once and broadcast: every process logs the same numbers, no reduction needed.
        self.log_dict(metrics, sync_dist=False, rank_zero_only=False)
        self.final_metrics.update(metrics)
        if prefix == "val":
            self.val_step = self.global_step

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # a few batches only: nothing to score
            self.evaluator.discard()
        else:
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
                # By default scales, margins, biases, ARFA's a and norm parameters are not weight-decayed
                # (docs/losses.md); optim.decay_1d_params=true decays them as the paper does.
                (decay if param.dim() > 1 or self.decay_1d_params else no_decay).append(param)
        optimizer = self.optimizer_factory([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = make_scheduler(self.scheduler_factory, optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def make_scheduler(factory: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> Any:
    """The configured scheduler, stepped once per optimizer step; one that takes ``T_max`` (the cosine)
    gets the run's length in steps, one with its own milestones (``sched=multistep``) does not."""
    func = getattr(factory, "func", factory)
    takes_length = "T_max" in inspect.signature(func).parameters
    return factory(optimizer, T_max=max(1, total_steps)) if takes_length else factory(optimizer)
