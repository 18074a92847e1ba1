"""A callback that records the labels of every training batch (for sampler stream tests)."""

import pytorch_lightning as pl


class BatchRecorder(pl.Callback):
    batches: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        BatchRecorder.batches.append((trainer.current_epoch, batch[1].tolist()))
