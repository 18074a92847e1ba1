"""The LightningModule: images -> backbone -> embeddings -> loss terms; evaluation only embeds, the
:class:`~doppel.evaluation.evaluator.Evaluator` scores."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from doppel.checkpoint import CLASS_SHARDS, SHARD_REQUEST, put_rows, read_class_rows, write_class_shard
from doppel.evaluation.evaluator import Evaluator
from doppel.host_syncs import at_sync_point
from doppel.losses import sharding
from doppel.losses.loss_set import LossSet
from doppel.losses.sharding import ClassShard
from doppel.sampling.doppelganger import Mining
from doppel.seeding import seed_for_rank

# Evaluation metrics are computed once on process 0 and broadcast: syncing them would only repeat that.
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val|test)/")
# The module checks the labels of each batch before transfer; the datamodule has no such hook to defer to.
warnings.filterwarnings("ignore", message="You have overridden `on_before_batch_transfer` in `LightningModule`")


class DoppelModule(pl.LightningModule):
    def __init__(self, backbone: nn.Module, loss_set: LossSet, optimizer: Any, scheduler: Any | None = None,
                 augment: nn.Module | None = None, views: int = 1, evaluator: Evaluator | None = None,
                 decay_1d_params: bool = False, mining: Mining | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.loss_set = loss_set
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.augment = augment or nn.Identity()
        self.views = views  # > 1: each image is augmented this many times, views stacked (NT-Xent)
        self.decay_1d_params = decay_1d_params  # the paper: weight decay on every parameter
        self.mining = mining  # how the prototype term proposes doppelgangers (None: no mining)
        self.evaluator = evaluator
        self.final_metrics: dict[str, float] = {}
        self.val_step: int | None = None  # global step of the latest validation

    def setup(self, stage: str) -> None:
        if stage == "fit":  # before a resumed run restores the streams it saved
            seed_for_rank(self, self.global_rank)
        # After the process group starts and before a checkpoint is restored or DDP wraps the model.
        shard_classifier(self, self.loss_set, self.trainer.global_rank, self.trainer.world_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    # -- training ----------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self._trainer is not None and self.trainer.training:
            self.loss_set.check_labels(batch[1])  # still on the host: no wait for the device
        return batch

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
            loss, logs, proposals = self.loss_set(embeddings.float(), labels, self.mining, step=self.global_step)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False,
                      prog_bar=False, batch_size=len(labels))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(labels))
        if self._trainer is not None and self.trainer.optimizers:  # filled on the device: no host-to-device copy
            lr = torch.full((), float(self.trainer.optimizers[0].param_groups[0]["lr"]), device=loss.device)
            self.log("train/lr", lr, batch_size=len(labels))
        # What callbacks read: the labels the loss saw (with loss.views > 1, each label once per view), the
        # doppelganger proposals (global class ids) and the embeddings; nothing [B, C] outlives the step.
        return {"loss": loss, "labels": labels, "proposals": proposals, "embeddings": embeddings.detach()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if at_sync_point(self.trainer):
            self.loss_set.check()

    def on_train_epoch_end(self) -> None:
        self.loss_set.check()

    # -- evaluation --------------------------------------------------------------------------
    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int = 0) -> None:
        images, index = batch
        plain = self.backbone(images)
        flipped = self.backbone(images.flip(-1)) if self.evaluator.flips[dataloader_idx] else None
        self.evaluator.add(dataloader_idx, index, plain, flipped)

    def _eval_end(self, prefix: str) -> None:
        term = self.loss_set.prototype_term
        term = None if term is None else term.unsharded()  # the whole classifier on process 0 (collective)
        classify = None if term is None else (lambda e: term.class_scores(e.to(self.device)).float().cpu())
        vectors = None if term is None else (lambda: term.class_vectors().detach().float().cpu())
        metrics = {f"{prefix}/{k}": v for k, v in self.evaluator.compute(classify, prefix, vectors,
                                                                                    self.device).items()}
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

    # -- a sharded classifier in checkpoints: one logical tensor, whatever the number of processes -------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Every process calls this. A sharded classifier's rows (weights and their optimizer state) go to
        one file per process when the save asks for it (:data:`SHARD_REQUEST`, the run's last.ckpt), else
        they are gathered into process 0, which writes the file. Never saves a run whose loss has gone bad."""
        self.loss_set.check()
        request = checkpoint.pop(SHARD_REQUEST, None)
        names = sharded_names(self, self.loss_set)
        if not names:
            return
        rows = {f"state_dict/{name}": checkpoint["state_dict"][name] for name in names}
        states, indices = self._optimizer_states(checkpoint, names)
        rows |= {f"optimizer/0/{index}/{key}": value for index in indices
                 for key, value in states[index].items() if _per_class(value)}
        shard = self.loss_set.prototype_term.shard
        if request is not None:
            write_class_shard(checkpoint, request, rows, ClassShard.bounds(shard.num_classes, shard.world_size))
            return
        for key, local in rows.items():  # the other processes keep their rows
            gathered = sharding.gather_classes(local, shard.num_classes)
            put_rows(checkpoint, key, local if gathered is None else gathered)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """This process's rows of the class tensors, from the checkpoint's class shards or whole tensors."""
        term = self.loss_set.prototype_term
        split = term is not None and term.split()
        if CLASS_SHARDS in checkpoint:  # written by any number of processes: read the rows of this one's classes
            read_class_rows(checkpoint, *((term.shard.lo, term.shard.hi) if split else (0, None)))
            return
        names = sharded_names(self, self.loss_set)
        if not names:
            return
        shard = term.shard
        for name in names:
            checkpoint["state_dict"][name] = checkpoint["state_dict"][name][shard.lo:shard.hi].clone()
        states, indices = self._optimizer_states(checkpoint, names)
        for index in indices:
            states[index] = {key: value[shard.lo:shard.hi].clone() if _per_class(value) else value
                             for key, value in states[index].items()}

    def _optimizer_states(self, checkpoint: dict[str, Any], names: list[str]) -> tuple[dict[int, dict], list[int]]:
        """(the optimizer's saved per-parameter states, the indices of the named parameters among them)."""
        optimizers = checkpoint.get("optimizer_states") or []
        if not optimizers:
            return {}, []
        order = [name for group in self._parameter_groups() for name, _ in group]
        saved = optimizers[0]["state"]
        return saved, [index for index in map(order.index, names) if index in saved]

    # -- optimisation ------------------------------------------------------------------------
    def _parameter_groups(self) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
        """(weight-decayed, not decayed) named parameters, in the optimizer's order."""
        decay, no_decay = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                # By default scales, margins, biases, ARFA's a and norm parameters are not weight-decayed
                # (docs/losses.md); optim.decay_1d_params=true decays them as the paper does.
                (decay if param.dim() > 1 or self.decay_1d_params else no_decay).append((name, param))
        return decay, no_decay

    def configure_optimizers(self) -> Any:
        decay, no_decay = ([param for _, param in group] for group in self._parameter_groups())
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


def shard_classifier(model: nn.Module, loss_set: LossSet, rank: int, world_size: int) -> None:
    """With ``classifier.sharded`` and several processes: keep this process's rows of the prototype term's
    class parameters and have DDP leave them alone (each process holds different rows). Idempotent."""
    term = loss_set.prototype_term
    if term is not None and world_size == 1:
        term.materialize_()  # sharded on one process: every row
    if term is None or not term.sharded or term.shard is not None or world_size == 1:
        return
    term.shard_(ClassShard(term.num_classes, rank, world_size))
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sharded_names(model, loss_set))


def sharded_names(model: nn.Module, loss_set: LossSet) -> list[str]:
    """Full names in ``model`` of this process's shard parameters (empty when nothing is split)."""
    term = loss_set.prototype_term
    if term is None or not term.split():
        return []
    prefix = next(name for name, module in model.named_modules() if module is term)
    return [f"{prefix}.{name}" for name in term.class_tensors()]


def _per_class(value: Any) -> bool:
    """An optimizer state tensor with a row per class (momentum, Adam's moments; not a step count)."""
    return isinstance(value, torch.Tensor) and value.dim() >= 1
