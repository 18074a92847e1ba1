"""``embed(cfg)``: every image of a data config embedded by a checkpoint's backbone (or an external backbone, as
``eval.py`` takes it), written as ``<run>/embeddings.npz`` and ``<run>/index.csv`` (``python embed.py``).

``embeddings.npz`` (stored, not compressed) holds ``embeddings`` (float32 [N, D], L2-normalised; the image's
and its mirror's embeddings summed first when ``embed.flip``), ``labels`` (int64, the data's class of each
image), ``class_names``, ``readable`` (False for an image left out under ``data.skip_corrupt``: its row is
zeros), and what :mod:`doppel.search` needs to embed a query the same way: ``config`` (the resolved settings
as YAML), ``checkpoint`` and ``image_size``. ``index.csv`` has one line per row: ``row,label,class_name,image``
(the file path, or the record / pack position).

Nothing holds all the embeddings: each process embeds every ``world``-th image into its own memory-mapped
part file, and process 0 streams the parts, interleaved back into image order, into the archive.
"""

from __future__ import annotations

import csv
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from doppel.config import build_evaluator
from doppel.data.dataset import CorruptImage, ImageSource
from doppel.data.transforms import ImageTransform
from doppel.evaluate import one_network
from doppel.evaluation.protocol import Embedded

EMBEDDINGS, INDEX = "embeddings.npz", "index.csv"
ROWS_PER_WRITE = 2 ** 16


def embed_images(backbone: torch.nn.Module, images: torch.Tensor, flip: bool) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 [B, D] unit rows, as the evaluation embeds (mirror summed when ``flip``)."""
    return Embedded(backbone(images).float(), backbone(images.flip(-1)).float() if flip else None).fused(flip)


def resolve_flip(cfg: DictConfig) -> bool:
    """``embed.flip``: true / false, or auto: as the run's protocols (mirror fusion when any of them fuses)."""
    flip = cfg.embed.flip
    if flip == "auto":
        return any(protocol.flip for protocol in build_evaluator(cfg).protocols.values())
    if not isinstance(flip, bool):
        raise ValueError(f"embed.flip={flip} must be auto (as the run's protocols), true or false.")
    return flip


class _Every(Dataset):
    """Every image of the data in order, with the evaluation transform; an unreadable one under
    ``skip_corrupt`` comes back black and marked."""

    def __init__(self, images: ImageSource, transform: ImageTransform, skip_corrupt: bool, shape: tuple) -> None:
        self.images, self.transform, self.skip_corrupt, self.shape = images, transform, skip_corrupt, shape

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, bool]:
        try:
            return self.transform(self.images[index], None), index, True
        except CorruptImage:
            if not self.skip_corrupt:
                raise
            return torch.zeros(self.shape, dtype=torch.uint8), index, False  # said once, by process 0


class _Embedder(pl.LightningModule):
    """Embeds this process's share of the images (items rank, rank + world, ...) into its part file."""

    def __init__(self, backbone: torch.nn.Module, flip: bool, dataset: _Every, batch_size: int, workers: int,
                 folder: Path) -> None:
        super().__init__()
        self.backbone, self.flip, self.dataset = backbone, flip, dataset
        self.batch_size, self.workers, self.folder = batch_size, workers, folder
        self.part: np.ndarray | None = None
        self.readable: np.ndarray | None = None

    def predict_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=range(rank, len(self.dataset), world),
                          num_workers=self.workers)

    def on_predict_start(self) -> None:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        rows = len(range(rank, len(self.dataset), world))
        self.part = np.lib.format.open_memmap(self.folder / f"rank{rank}.npy", mode="w+", dtype=np.float32,
                                              shape=(rows, self.backbone.embedding_dim))
        self.readable = np.ones(rows, dtype=bool)

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        images, index, readable = batch
        index, readable = index.cpu(), readable.cpu()
        vectors = embed_images(self.backbone, images, self.flip).cpu()
        vectors = torch.where(readable[:, None], vectors, torch.zeros_like(vectors))
        local = (index // self.trainer.world_size).numpy()
        if not torch.isfinite(vectors).all():
            raise FloatingPointError(f"embed: the network gives non-finite embeddings (images {index[:5].tolist()} "
                                     "...): its weights diverged; embed another checkpoint.")
        self.part[local] = vectors.numpy()
        self.readable[local] = readable.numpy()

    def on_predict_end(self) -> None:
        self.part.flush()
        np.save(self.folder / f"readable{self.trainer.global_rank}.npy", self.readable)
        self.part = None


def image_name(images: ImageSource, source: str, index: int) -> str:
    name = getattr(images, "name", None)
    return name(index) if name is not None else f"{source}[{index}]"


def embed(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    """Writes ``embeddings.npz`` and ``index.csv`` into ``cfg.paths.output_dir``; returns the archive's path."""
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg, datamodule, network, path = one_network(cfg, overrides or [], "embed.py")
    flip = resolve_flip(cfg)
    shape = datamodule.image_shape()
    backbone = network()
    data = datamodule.data
    parts = output_dir / "embeddings.parts"
    parts.mkdir(exist_ok=True)
    module = _Embedder(backbone, flip, _Every(data.images, datamodule.transform, datamodule.skip_corrupt, shape),
                       datamodule.eval_batch_size, datamodule.num_workers, parts)
    trainer = pl.Trainer(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
                         strategy=cfg.trainer.strategy, precision=cfg.trainer.precision, logger=False,
                         enable_progress_bar=cfg.trainer.get("enable_progress_bar", True),
                         enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=str(output_dir))
    trainer.predict(module, return_predictions=False)
    trainer.strategy.barrier()
    archive = output_dir / EMBEDDINGS
    if trainer.global_rank == 0:
        readable = _write_archive(archive, parts, trainer.world_size, len(data.images), backbone.embedding_dim, {
            "labels": data.labels.numpy().astype(np.int64), "class_names": np.array(data.class_names, dtype=str),
            "config": np.array(OmegaConf.to_yaml(cfg)), "checkpoint": np.array(path or ""),
            "image_size": np.array(shape[-1]), "flip": np.array(flip)})
        _write_index(output_dir / INDEX, data, readable)
        shutil.rmtree(parts)
        if not readable.all():
            names = [image_name(data.images, data.source, int(i)) for i in np.flatnonzero(~readable)[:3]]
            warnings.warn(f"data.skip_corrupt: {int((~readable).sum())} unreadable images were left out (rows of "
                          f"zeros, readable=0 in {INDEX}), e.g. {', '.join(names)}.", stacklevel=2)
        rank_zero_info(f"embed: {len(data.images):,} images ({int((~readable).sum())} unreadable) -> {archive} and "
                       f"{output_dir / INDEX} (dimension {backbone.embedding_dim}, mirror fusion {flip})")
    trainer.strategy.barrier()
    return archive


def _write_archive(archive: Path, parts: Path, world: int, total: int, dim: int,
                   extras: dict[str, np.ndarray]) -> np.ndarray:
    """The archive, its ``embeddings`` streamed from the processes' part files (row i is row i // world of
    part i % world); returns whether each image was readable."""
    shards = [np.load(parts / f"rank{r}.npy", mmap_mode="r") for r in range(world)]
    readable = np.empty(total, dtype=bool)
    for rank in range(world):
        readable[rank::world] = np.load(parts / f"readable{rank}.npy")
    step = max(world, ROWS_PER_WRITE // world * world)
    partial = archive.with_suffix(".npz.partial")
    with zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zipped:
        with zipped.open("embeddings.npy", "w", force_zip64=True) as file:
            np.lib.format.write_array_header_2_0(file, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                                                        "fortran_order": False, "shape": (total, dim)})
            for start in range(0, total, step):
                stop = min(start + step, total)
                block = np.empty((stop - start, dim), dtype=np.float32)
                for rank in range(world):
                    block[rank::world] = shards[rank][(start + rank) // world:(stop - rank + world - 1) // world]
                file.write(block.tobytes())
        for name, value in {**extras, "readable": readable}.items():
            with zipped.open(f"{name}.npy", "w", force_zip64=True) as file:
                np.lib.format.write_array(file, np.asarray(value), allow_pickle=False)
    partial.replace(archive)
    return readable


def _write_index(path: Path, data: Any, readable: np.ndarray) -> None:
    labels = data.labels.tolist()
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["row", "label", "class_name", "image", "readable"])
        for row, label in enumerate(labels):
            writer.writerow([row, label, data.class_names[label], image_name(data.images, data.source, row),
                             int(readable[row])])
