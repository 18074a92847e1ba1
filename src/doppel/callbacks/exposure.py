"""How evenly the sampler exposes the classes: per epoch, in how many batches each class appeared.

A sampler that keeps drawing the same hubs (doppelganger chains pulling in the same look-alikes) starves
other classes; issue 12's diagnosis of the emoji runs found exactly that. Logged every epoch, for every
sampler, so runs can be compared:

- ``sampler/exposure_cv``: coefficient of variation (population standard deviation / mean) of the
  per-class batch counts over all training classes (0 for a perfectly even sampler);
- ``sampler/exposure_max``: the most-drawn class's count over the mean count;
- ``sampler/exposure_starved``: share of classes drawn in fewer than half the mean number of batches.

A batch is one sampler batch (with several processes, each process's batch; counts are summed over the
processes, so they equal the single-process stream's).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch


def exposure_stats(counts: torch.Tensor) -> dict[str, float]:
    """The three statistics above from the per-class batch counts of one epoch."""
    counts = counts.double()
    mean = counts.mean()
    if mean == 0:
        return {"sampler/exposure_cv": 0.0, "sampler/exposure_max": 0.0, "sampler/exposure_starved": 0.0}
    return {"sampler/exposure_cv": float(counts.std(unbiased=False) / mean),
            "sampler/exposure_max": float(counts.max() / mean),
            "sampler/exposure_starved": float((counts < mean / 2).double().mean())}


class ExposureMonitor(pl.Callback):
    def __init__(self, num_classes: int) -> None:
        self.counts = torch.zeros(num_classes, dtype=torch.long)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.counts = self.counts.to(trainer.strategy.root_device)  # the module moves there after setup

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        labels = batch[1]
        # +1 for each class present, however often: repeated labels write the same value. On the device.
        self.counts.scatter_(0, labels, self.counts.gather(0, labels) + 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        counts = self.counts
        if trainer.world_size > 1:
            counts = pl_module.all_gather(counts).sum(0)
        pl_module.log_dict(exposure_stats(counts.cpu()), rank_zero_only=True)
        self.counts.zero_()  # after the epoch's stats; a mid-epoch checkpoint keeps the counts so far

    # Each process counts its own batches; a checkpoint (written by process 0) keeps every process's counts.
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        counts = self.counts[None]
        if trainer.world_size > 1:
            counts = pl_module.all_gather(self.counts)
        checkpoint["exposure_counts"] = counts.to("cpu", copy=True)  # [processes, classes]

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("exposure_counts")
        if saved is None:
            return
        if len(saved) == trainer.world_size:
            counts = saved[trainer.global_rank].clone()
        else:  # saved by another number of processes: only the sum over processes is logged, keep it on one
            counts = saved.sum(0) if trainer.global_rank == 0 else torch.zeros_like(saved[0])
        self.counts = counts.to(self.counts.device)
