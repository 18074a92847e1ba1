"""A callback that records the labels of every training batch (for sampler stream tests)."""

import pytorch_lightning as pl


class BatchRecorder(pl.Callback):
    batches: list[tuple[int, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        BatchRecorder.batches.append((trainer.current_epoch, batch[1].tolist()))


class MiningRecorder(pl.Callback):
    """Saves, in the run directory, each process's final table and (from the first process) every step's
    global batch as the miner saw it: the labels and classifier logits of all processes."""

    def __init__(self, folder: str) -> None:
        self.folder, self.steps = folder, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        gathered = pl_module.all_gather({"labels": pl_module.last_labels,
                                         "logits": pl_module.loss_set.prototype_term.last_logits})
        if trainer.world_size > 1:
            gathered = {k: v.flatten(0, 1) for k, v in gathered.items()}
        self.steps.append({k: v.cpu() for k, v in gathered.items()})

    def on_train_end(self, trainer, pl_module):
        import torch

        mining = next(c for c in trainer.callbacks if type(c).__name__ == "DoppelgangerMining")
        torch.save(mining.table.table, f"{self.folder}/table_rank{trainer.global_rank}.pt")
        if trainer.global_rank == 0:
            torch.save(self.steps, f"{self.folder}/global_batches.pt")
