"""The DataModule: training images through an identity batch sampler, evaluation images in order."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from doppel.data.emoji import Split, check_novel_fraction, load_emoji_npz, resolve_path, split_emoji
from doppel.sampling.doppelganger import DoppelgangerTable
from doppel.seeding import stable_seed


class TrainLoader(DataLoader):
    """A DataLoader over an identity batch sampler that draws nothing until its first ``next()``.

    Lightning creates an epoch's iterator before it calls ``set_epoch`` and before callbacks restore a
    resumed sampler, and with workers PyTorch would draw the first batches right then. Its own
    generator, reseeded per (seed, epoch, rank), gives the workers' base seed without touching the
    global RNG, so starting an epoch shifts no random stream.
    """

    def __iter__(self) -> Iterator[Any]:
        sampler = self.batch_sampler
        self.generator.manual_seed(stable_seed("loader", sampler.seed, sampler.epoch, sampler.rank))
        yield from super().__iter__()


class EmojiDataModule(pl.LightningDataModule):
    """Base / novel emoji identities (see :mod:`doppel.data.emoji`).

    Training batches come from the sampler config (``sampler=random`` or ``sampler=doppel``), built in
    :meth:`train_dataloader` where the process's rank is known. Evaluation batches carry
    (images, label, role) for :func:`doppel.evaluation.protocol.evaluate_protocol`.
    """

    def __init__(self, path: str | None = None, novel_fraction: float = 0.2, prototype_vendor: str = "twitter",
                 max_families: int | None = None, eval_batch_size: int = 512, num_workers: int = 0) -> None:
        super().__init__()
        resolve_path(path)  # settings are checked here, before setup() loads anything
        check_novel_fraction(novel_fraction)
        for key, value, low in (("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0),
                                ("max_families", max_families, 1)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"data.{key}={value} must be an integer >= {low}"
                                 f"{' or null' if key == 'max_families' else ''}.")
        self.path, self.novel_fraction, self.prototype_vendor = path, novel_fraction, prototype_vendor
        self.max_families, self.eval_batch_size, self.num_workers = max_families, eval_batch_size, num_workers
        self.split: Split | None = None
        self.sampler_cfg: DictConfig | None = None
        self.table: DoppelgangerTable | None = None
        self.seed = 0
        self.train_sampler = None

    def setup(self, stage: str | None = None) -> None:
        if self.split is None:
            self.split = split_emoji(load_emoji_npz(self.path), self.novel_fraction, self.prototype_vendor,
                                     self.max_families)

    @property
    def num_classes(self) -> int:
        self.setup()
        return self.split.num_classes

    def image_shape(self) -> tuple[int, int, int]:
        self.setup()
        return tuple(self.split.images.shape[1:])

    def attach_sampler(self, sampler_cfg: DictConfig, table: DoppelgangerTable, seed: int) -> None:
        """Runtime wiring done by ``train()``: the sampler config, the shared table and the seed."""
        self.sampler_cfg, self.table, self.seed = sampler_cfg, table, seed

    def build_sampler(self, rank: int = 0) -> Any:
        self.setup()
        kwargs: dict[str, Any] = {"labels": self.split.training_set()[1], "seed": self.seed, "rank": rank}
        sampler_class = get_class(self.sampler_cfg._target_)
        if "table" in inspect.signature(sampler_class).parameters:
            kwargs["table"] = self.table
        # Called directly, not through hydra.instantiate, so the sampler's own error reaches the user.
        settings = {k: v for k, v in OmegaConf.to_container(self.sampler_cfg).items() if k != "_target_"}
        return sampler_class(**settings, **kwargs)

    def train_dataloader(self) -> DataLoader:
        if self.sampler_cfg is None:
            raise RuntimeError("EmojiDataModule.attach_sampler() must be called before training.")
        self.train_sampler = self.build_sampler(self.trainer.global_rank if self.trainer is not None else 0)
        return TrainLoader(TensorDataset(*self.split.training_set()), batch_sampler=self.train_sampler,
                           num_workers=self.num_workers, generator=torch.Generator())

    def _eval_loader(self) -> DataLoader:
        dataset = TensorDataset(self.split.images, self.split.label, self.split.role)
        return DataLoader(dataset, batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()
