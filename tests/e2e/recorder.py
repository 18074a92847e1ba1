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
        self.folder, self.steps, self.logits = folder, [], None

    def on_train_start(self, trainer, pl_module):
        term = pl_module.loss_set.prototype_term
        compute = term.loss_and_logits

        def recording(embeddings, labels):  # the logits the term computed, kept for this test only
            loss, view = compute(embeddings, labels)
            self.logits = view.logits.detach().clone()
            return loss, view

        term.loss_and_logits = recording

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        term = pl_module.loss_set.prototype_term
        if term.split():  # every process holds the logits of its classes for the whole global batch
            from doppel.losses.sharding import gather_classes

            logits = gather_classes(self.logits.T.contiguous(), term.num_classes)
            labels = pl_module.all_gather(outputs["labels"]).flatten(0, 1)
            gathered = {"labels": labels, "logits": None if logits is None else logits.T}
        else:
            gathered = pl_module.all_gather({"labels": outputs["labels"], "logits": self.logits})
            if trainer.world_size > 1:
                gathered = {k: v.flatten(0, 1) for k, v in gathered.items()}
        self.steps.append({k: v.cpu() for k, v in gathered.items() if v is not None})

    def on_train_end(self, trainer, pl_module):
        import torch

        mining = next(c for c in trainer.callbacks if type(c).__name__ == "DoppelgangerMining")
        torch.save(mining.table.table, f"{self.folder}/table_rank{trainer.global_rank}.pt")
        if trainer.global_rank == 0:
            torch.save(self.steps, f"{self.folder}/global_batches.pt")


class ParallelRecorder(pl.Callback):
    """Saves, per process, every step's batch (indices into the training set, as the sampler drew them),
    the doppelganger table the step's batch was drawn with, and the model's random generators at the start
    of training."""

    def __init__(self, folder: str) -> None:
        self.folder, self.steps = folder, []

    def on_train_start(self, trainer, pl_module):
        from doppel.seeding import named_generators

        self.generators = {name: g.get_state() for name, g in named_generators(pl_module).items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        indices = next(b for i, b in trainer.datamodule.train_batches.recent if i == batch_idx)
        mining = next(c for c in trainer.callbacks if type(c).__name__ == "DoppelgangerMining")
        self.steps.append({"indices": list(indices), "labels": batch[1].cpu(), "table": mining.table.table.clone()})

    def on_train_end(self, trainer, pl_module):
        import torch

        labels = trainer.datamodule.split.label[trainer.datamodule.split.training]
        torch.save({"steps": self.steps, "generators": self.generators, "training_labels": labels},
                   f"{self.folder}/rank{trainer.global_rank}.pt")


class MemoryRecorder(pl.Callback):
    """Writes the process's anonymous resident memory (RssAnon: what holding data would take; the page cache
    of files it reads is not counted) at the start of training, after every batch and at the end, and the
    bytes it read through read calls (rchar), to ``<folder>/memory.json``."""

    def __init__(self, folder: str) -> None:
        self.folder, self.samples = folder, []

    @staticmethod
    def _status() -> dict:
        from pathlib import Path

        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
        io = dict(line.split(":", 1) for line in Path("/proc/self/io").read_text().splitlines())
        return {"rss_anon": int(status["RssAnon"].split()[0]) * 1024, "rchar": int(io["rchar"])}

    def on_fit_start(self, trainer, pl_module):
        self.samples.append(self._status())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.samples.append(self._status())

    def on_fit_end(self, trainer, pl_module):
        import json

        self.samples.append(self._status())
        peak = max(s["rss_anon"] for s in self.samples)
        with open(f"{self.folder}/memory.json", "w") as file:
            json.dump({"peak_rss_anon": peak, "rchar": self.samples[-1]["rchar"]}, file)


class LogicalStateRecorder(pl.Callback):
    """Writes, when training starts (after a resume restored everything), the whole model as one process
    would hold it (a sharded classifier gathered from its shards), the doppelganger table and the step, to
    ``<folder>/start_w<processes>.pt``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer, pl_module):
        import torch

        from doppel.losses.sharding import gather_classes
        from doppel.module import sharded_names

        classes = pl_module.loss_set.prototype_term.num_classes
        sharded = sharded_names(pl_module, pl_module.loss_set)
        state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        for name in sharded:
            state[name] = gather_classes(state[name], classes)
        # The momentum of every parameter, by its index in the optimizer's state (a shard's gathered whole)
        optimizer = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        momentum = {}
        for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
            buffer = optimizer.state.get(param, {}).get("momentum_buffer")
            if buffer is not None:
                momentum[index] = gather_classes(buffer, classes) if names[id(param)] in sharded else buffer.clone()
        mining = next(c for c in trainer.callbacks if type(c).__name__ == "DoppelgangerMining")
        if trainer.global_rank == 0:
            torch.save({"state_dict": state, "momentum": momentum, "table": mining.table.table.clone(),
                        "step": trainer.global_step}, f"{self.folder}/start_w{trainer.world_size}.pt")
