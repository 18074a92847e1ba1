"""One DataModule for every format: a reader's dataset, the run's split, the training loader through an
identity batch sampler, and the evaluation images in order with their roles."""

from __future__ import annotations

import difflib
import inspect
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import get_class, get_method
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, get_worker_info

from doppel.data.dataset import CorruptImage, DataError, EncodedImages, IdentityData, ImageSet, Part
from doppel.data.device_decode import EncodedBatch, collate_encoded, decode_batch, read_encoded
from doppel.data.split import Split, check_novel_fraction, split_dataset, take
from doppel.data.transforms import ImageTransform
from doppel.sampling.doppelganger import DoppelgangerTable
from doppel.sampling.resumable import KeyedBatches, ResumableBatches
from doppel.sampling.samplers import SamplerContext
from doppel.seeding import stable_seed


class TrainLoader(DataLoader):
    """A DataLoader over an identity batch sampler that draws nothing until its first ``next()``.

    Lightning creates an epoch's iterator before it calls ``set_epoch`` and before callbacks restore a
    resumed sampler, and with workers PyTorch would draw the first batches right then. Its own
    generator, reseeded per (seed, epoch, rank), gives the workers' base seed without touching the
    global RNG, so starting an epoch shifts no random stream.
    """

    def __iter__(self) -> Iterator[Any]:
        sampler = self.batch_sampler.sampler
        self.generator.manual_seed(stable_seed("loader", sampler.seed, sampler.epoch, sampler.rank))
        yield from super().__iter__()


DECODERS = ("cpu", "gpu")  # data.decode: in the workers (Pillow) or on the device (nvJPEG)


class _Images(Dataset):
    """Images of the split at ``positions``, transformed; a corrupt image is an error, or with
    ``skip_corrupt``: in training, replaced by the next readable training image of its class; in an
    evaluation set, left out (its item index comes back negative, ``-1 - item``, and the evaluator drops
    it), never replaced: a query swapped for another image of its class (often its own prototype) would be
    scored as that image. Each is reported."""

    def __init__(self, data: IdentityData, split: Split, positions: torch.Tensor, transform: ImageTransform,
                 train: bool, skip_corrupt: bool, encoded: bool = False) -> None:
        # NumPy arrays: one buffer each, which forked workers share (a Python list of 42M ints is 1.5 GB, and
        # reading it touches every object's reference count, so copy-on-write duplicates it per worker).
        self.images, self.index = data.images, take(split.index, positions).numpy()
        self.label, self.part = take(split.label, positions).numpy(), take(split.part, positions).numpy()
        self.names = split.names
        self.transform, self.train, self.skip_corrupt = transform, train, skip_corrupt
        self.encoded = encoded  # data.decode=gpu: training items are bytes, decoded after the transfer
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.index)

    def load(self, position: int, seed: int | None) -> torch.Tensor:
        try:
            image = self.images[int(self.index[position])]
        except CorruptImage as error:
            if not (self.skip_corrupt and self.train):
                raise
            image = self._replacement(position, error)
        return self.transform(image, seed if self.train else None)

    def _replacement(self, position: int, error: CorruptImage) -> torch.Tensor:
        """The next readable image of the class in the same part (training: another training image)."""
        self.skipped += 1
        warnings.warn(f"data.skip_corrupt: {error.where} is unreadable and was replaced by the next readable "
                      f"training image of its class ({self.skipped} replacements so far in this process).",
                      stacklevel=2)
        label, part = self.label[position], self.part[position]
        same = np.flatnonzero((self.label == label) & (self.part == part)).tolist()
        start = same.index(position)
        for other in same[start + 1:] + same[:start]:
            try:
                return self.images[int(self.index[other])]
            except CorruptImage:
                continue
        raise DataError(f"data.skip_corrupt: every training image of class {self.names[label]!r} is unreadable "
                        f"(one is {error.where}): replace its images or remove the class from the data.")

    def __getitem__(self, item: Any) -> tuple[Any, ...]:
        if self.train and self.encoded:
            position, seed = item
            index = int(self.index[position])
            name = self.images.name(index)
            return read_encoded(self.images.fetch(index), name), seed, name, int(self.label[position])
        if self.train:
            position, seed = item
            return self.load(position, seed), int(self.label[position])
        try:
            return self.load(item, None), item
        except CorruptImage as error:
            if not self.skip_corrupt:
                raise
            warnings.warn(f"data.skip_corrupt: {error.where} ({Part(self.part[item]).name}) is unreadable: left "
                          "out of the evaluation, not replaced.", stacklevel=2)
            return self._placeholder(item), -1 - item

    def _placeholder(self, item: int) -> torch.Tensor:
        """Any readable image, to fill the batch slot of one left out (its embedding is dropped)."""
        for other in list(range(item + 1, len(self.index))) + list(range(item)):
            try:
                return self.load(other, None)
            except CorruptImage:
                continue
        raise DataError("data.skip_corrupt: no image of the evaluation set is readable.")


def collate(samples: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """Stack a batch. Decoded images are [3, H, W] views of [H, W, 3] memory: those are stacked as they lie
    (one plain copy, not a strided gather per image) into an [N, 3, H, W] channels-last batch; in a
    worker, straight into shared memory (no second copy on the way to the main process)."""
    images, *rest = zip(*samples)
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        raise DataError(f"the images of a batch have different sizes {sorted(sizes)[:3]}: set data.resize and "
                        "data.crop so that every image is cropped to one size.")
    channels_last = all(image.permute(1, 2, 0).is_contiguous() for image in images)
    planes = [image.permute(1, 2, 0) for image in images] if channels_last else list(images)
    out = None
    if get_worker_info() is not None:
        numel = len(planes) * planes[0].numel()
        out = planes[0].new(planes[0].untyped_storage()._new_shared(numel * planes[0].element_size()))
        out = out.view(len(planes), *planes[0].shape)
    batch = torch.stack(planes, out=out)
    return (batch.permute(0, 3, 1, 2) if channels_last else batch, *(torch.tensor(column) for column in rest))


def collate_training(samples: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """:func:`collate`, and a warning when no image of the batch varies (all black, all one colour): such
    data trains to chance without any error."""
    batch = collate(samples)
    flat = batch[0].flatten(1)
    if bool((flat.amax(dim=1) == flat.amin(dim=1)).all()):
        warnings.warn("a training batch holds only constant images (every pixel of each image alike, e.g. all "
                      "black): check the data and its decoding; the network cannot learn from them.", stacklevel=2)
    return batch


class IdentityDataModule(pl.LightningDataModule):
    """Training and evaluation data from any reader (``data.reader``: a function returning
    :class:`IdentityData`; its own settings, e.g. ``data.path`` or ``data.root``, are passed through).

    Training batches come from the sampler config, built in :meth:`train_dataloader` where the process's
    rank is known. Evaluation sets (images of the split, pair sets) are chosen by the evaluation protocols
    (:meth:`evaluate_on`); their batches carry (images, item index in the set), each process loading
    every ``world_size``-th item of each set.
    """

    def __init__(self, reader: str, novel_fraction: float = 0.2, max_groups: int | None = None,
                 base_queries: bool = True, resize: int | None = None, crop: int | None = None,
                 crop_scale: tuple[float, float] = (0.08, 1.0), skip_corrupt: bool = False,
                 eval_batch_size: int = 512, num_workers: int = 0, pin_memory: bool | None = None,
                 persistent_workers: bool = False, prefetch_factor: int | None = None, decode: str = "cpu",
                 **reader_settings: Any) -> None:
        super().__init__()
        self.read = _reader(reader, reader_settings)
        for key in ("path", "root"):  # a path that is given must exist: checked before anything is read
            value = reader_settings.get(key)
            if value is not None and not Path(value).expanduser().exists():
                raise FileNotFoundError(f"data.{key}={str(value)!r} does not exist: point it at your data "
                                        "(docs/data.md gives each format's layout).")
        check_novel_fraction(novel_fraction)
        for key, value, low in (("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0),
                                ("max_groups", max_groups, 1)):
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"data.{key}={value} must be an integer >= {low}"
                                 f"{' or null' if key == 'max_groups' else ''}.")
        if decode not in DECODERS:
            raise ValueError(f"data.decode={decode!r} is not one of {DECODERS}.")
        if decode == "gpu" and not torch.cuda.is_available():
            raise ValueError("data.decode=gpu decodes JPEGs with nvJPEG on a CUDA device and none is available: "
                             "use data.decode=cpu.")
        if decode == "gpu" and skip_corrupt:
            raise ValueError("data.skip_corrupt=true replaces unreadable images in the workers, which "
                             "data.decode=gpu leaves undecoded: use one or the other.")
        self.decode = decode
        self.transform = ImageTransform(resize, crop, tuple(crop_scale))
        self.reader_settings = reader_settings
        self.novel_fraction, self.max_groups, self.base_queries = novel_fraction, max_groups, base_queries
        self.skip_corrupt, self.eval_batch_size, self.num_workers = skip_corrupt, eval_batch_size, num_workers
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        if prefetch_factor is not None and (not isinstance(prefetch_factor, int) or prefetch_factor < 1):
            raise ValueError(f"data.prefetch_factor={prefetch_factor} must be a positive integer or null.")
        # Batches each worker loads ahead of training (PyTorch's default 2). The sampler draws them, and so
        # chooses their doppelgangers, num_workers x prefetch_factor steps before the table sees their logits.
        self.prefetch_factor = prefetch_factor
        self.data: IdentityData | None = None
        self.split: Split | None = None
        self.sampler_cfg: DictConfig | None = None
        self.table: DoppelgangerTable | None = None
        self.seed = 0
        self.train_sampler = None
        self.train_batches = None
        self.eval_positions: torch.Tensor | None = None  # split images to embed (None: none)
        self.pair_sets: list[ImageSet] = []

    @property
    def folder(self) -> Path | None:
        """The data folder (``data.root``, or the folder of ``data.path``), where pair sets are looked up."""
        given = self.reader_settings.get("root") or self.reader_settings.get("path")
        if given is None:
            return None
        folder = Path(given).expanduser()
        return folder if folder.is_dir() else folder.parent

    def locate(self, path: str, key: str) -> Path:
        """A file named by setting ``key``: as given, else in the data folder (InsightFace ships lfw.bin beside
        train.rec)."""
        candidates = [Path(path).expanduser()]
        if self.folder is not None and not candidates[0].is_absolute():
            candidates.append(self.folder / path)
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise FileNotFoundError(f"{key}: {path!r} is neither a file nor in the data folder "
                                f"({', '.join(str(c) for c in candidates)}).")

    def setup(self, stage: str | None = None) -> None:
        if self.data is None:
            self.data = self.read(**self.reader_settings)
            self.split = split_dataset(self.data, self.novel_fraction, self.max_groups, self.base_queries)

    @property
    def benchmark(self) -> str | None:
        self.setup()
        return self.data.benchmark

    @property
    def num_classes(self) -> int:
        self.setup()
        return self.split.num_classes

    @property
    def class_names(self) -> list[str]:
        """Name of every run label (base classes first)."""
        self.setup()
        return self.split.names

    @property
    def base_lookalikes(self) -> list[set[int]] | None:
        """Per base class, the base classes the data knows look like it (None: it knows none)."""
        self.setup()
        return self.split.base_lookalikes(self.data)

    @property
    def class_groups(self) -> list[str] | None:
        """Per run label (base classes, then novel), the family its identity belongs to (None: the data
        names no families)."""
        self.setup()
        if self.data.groups is None:
            return None
        groups = [""] * len(self.split.names)
        for cls, label in zip(self.data.labels[self.split.index].tolist(), self.split.label.tolist()):
            groups[label] = self.data.groups[cls]
        return groups

    def class_images(self, labels: list[int]) -> torch.Tensor:
        """The first training image of each base class in ``labels``, as the network receives it without
        random transforms: uint8 [len(labels), C, H, W]."""
        self.setup()
        training = self.split.training
        train_labels = self.split.label[training]
        first = torch.full((self.split.num_classes,), -1, dtype=torch.long)
        # scatter_reduce with amin: the smallest training position of each class
        first = first.scatter_reduce(0, train_labels, torch.arange(len(training)), reduce="amin", include_self=False)
        missing = [label for label in labels if not 0 <= label < self.split.num_classes or first[label] < 0]
        if missing:
            raise ValueError(f"class_images: labels {missing[:5]} are not base classes with a training image.")
        dataset = self._dataset(training, train=False)
        return collate([dataset[int(first[label])][:1] for label in labels])[0]

    def _dataset(self, positions: torch.Tensor, train: bool) -> _Images:
        return _Images(self.data, self.split, positions, self.transform, train, self.skip_corrupt)

    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image as the network receives it."""
        self.setup()
        return tuple(self._dataset(self.split.training[:1], train=False)[0][0].shape)

    def training_images(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` random training images as one batch, without random transforms (LSUV's batch)."""
        self.setup()
        training = self.split.training
        pick = torch.randperm(len(training), generator=generator)[:count]
        dataset = self._dataset(training, train=False)
        return collate([dataset[int(p)][:1] for p in pick])[0]

    # -- samplers ----------------------------------------------------------------------------
    def attach_sampler(self, sampler_cfg: DictConfig, table: DoppelgangerTable, seed: int) -> None:
        """Runtime wiring done by ``train()``: the sampler config, the shared table and the seed."""
        self.sampler_cfg, self.table, self.seed = sampler_cfg, table, seed

    def build_sampler(self, rank: int = 0, world_size: int = 1) -> Any:
        self.setup()
        sampler_class = get_class(self.sampler_cfg._target_)
        labels = take(self.split.label, self.split.training)
        context = SamplerContext(labels, self.seed, rank, world_size, self.table if sampler_class.uses_table else None)
        # Called directly, not through hydra.instantiate, so the sampler's own error reaches the user.
        settings = {k: v for k, v in OmegaConf.to_container(self.sampler_cfg).items() if k != "_target_"}
        return sampler_class(context, **settings)

    # -- loaders -----------------------------------------------------------------------------
    def _loader_options(self) -> dict[str, Any]:
        return {"num_workers": self.num_workers, "pin_memory": self.pin_memory, "collate_fn": collate,
                "persistent_workers": self.persistent_workers}

    def train_dataloader(self) -> DataLoader:
        if self.sampler_cfg is None:
            raise RuntimeError("IdentityDataModule.attach_sampler() must be called before training.")
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        self.train_sampler = self.build_sampler(rank, world_size)
        self.train_batches = ResumableBatches(self.train_sampler)  # the epoch's position, for exact resume
        ahead = {"prefetch_factor": self.prefetch_factor} if self.num_workers and self.prefetch_factor else {}
        dataset = self._dataset(self.split.training, train=True)
        if self.decode == "gpu":
            if not isinstance(self.data.images, EncodedImages):
                raise ValueError("data.decode=gpu decodes the stored JPEG bytes of an encoded format (folder, "
                                 "recordio, csv, tsv); this data holds decoded pixels: use data.decode=cpu.")
            dataset.encoded = True
        collate_fn = collate_encoded if self.decode == "gpu" else collate_training
        return TrainLoader(dataset, batch_sampler=KeyedBatches(self.train_batches), generator=torch.Generator(),
                           **{**self._loader_options(), "collate_fn": collate_fn, **ahead})

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """data.decode=gpu: the batch's bytes are decoded on the device its labels have just moved to."""
        if isinstance(batch[0], EncodedBatch):
            return decode_batch(batch[0], self.transform, batch[1].device), batch[1]
        return batch

    def evaluate_on(self, positions: torch.Tensor | None, pair_sets: list[ImageSet]) -> None:
        """The evaluation sets, in loader order: the split's images at ``positions`` (if any), then each pair
        set's images in pair order."""
        self.eval_positions, self.pair_sets = positions, list(pair_sets)

    def _eval_loaders(self) -> list[DataLoader]:
        datasets: list[Dataset] = []
        if self.eval_positions is not None:
            datasets.append(self._dataset(self.eval_positions, train=False))
        datasets += [_PairImages(pairs, self.transform) for pairs in self.pair_sets]
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer else (0, 1)
        # Each process embeds every world_size-th item; the evaluator gathers them back in order.
        return [DataLoader(d, batch_size=self.eval_batch_size, sampler=range(rank, len(d), world_size),
                           **self._loader_options()) for d in datasets]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders()


class _PairImages(Dataset):
    """An image set's images in order (a pack's pair i = items 2i, 2i + 1), with the evaluation transform."""

    def __init__(self, image_set: ImageSet, transform: ImageTransform) -> None:
        self.images, self.transform = image_set.images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index], None), index


def _reader(name: str, settings: dict[str, Any]) -> Callable[..., IdentityData]:
    """The reader function ``name``, with ``settings`` checked against its parameters."""
    try:
        read = get_method(name)
    except Exception:
        raise ValueError(f"data.reader={name} cannot be imported: check its spelling.") from None
    parameters = inspect.signature(read).parameters
    for key in settings:
        if key not in parameters:
            hint = difflib.get_close_matches(key, list(parameters), n=1)
            raise ValueError(f"data.{key} is not a setting{f' (did you mean {hint[0]}?)' if hint else ''}; this "
                             f"format ({name}) takes: {', '.join(sorted(parameters))} besides the DataModule's own.")
    return read
