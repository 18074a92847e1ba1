"""The IE paper's small sets, from their original files (``data=cifar10``, ``data=cifar100``,
``data=mnist``): training images are trained on, test images are base queries (each classified among the
class prototypes: the classification accuracy the paper reports is ``base/top1``).

CIFAR "python version" batches (``data_batch_1`` .. ``5``, ``test_batch``, ``batches.meta``; CIFAR-100:
``train``, ``test``, ``meta``) are pickles of a dict with a uint8 [N, 3072] ``data`` array (R, G, B planes
of 32x32): read by :func:`safe_load`, which rebuilds the array without running the file. CIFAR-100's
superclasses are the groups. MNIST: the idx files (``train-images-idx3-ubyte`` etc., ``.gz`` or not):
magic, big-endian sizes, then bytes; grey images are repeated into 3 channels.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

from doppel.data.dataset import DataError, IdentityData, Part, TensorImages, require
from doppel.data.readers.safe_pickle import safe_load


def _batch(path: Path, label_key: str) -> tuple[np.ndarray, list[int], dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: data.root must be the extracted CIFAR python folder "
                                "(cifar-10-batches-py or cifar-100-python).")
    batch = safe_load(path.read_bytes(), str(path), arrays=True)
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        raise DataError(f"{path}: not a CIFAR batch (a dict with 'data' and {label_key!r}).")
    data = np.asarray(batch["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(batch[label_key]):
        raise DataError(f"{path}: 'data' must be uint8 [N, 3072] with one label per row, got {data.dtype} "
                        f"{data.shape} for {len(batch[label_key])} labels.")
    return data, list(batch[label_key]), batch


def _names(values: list) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_cifar(root: str | None = None, classes: int = 10) -> IdentityData:
    if classes not in (10, 100):
        raise ValueError(f"data.classes={classes} must be 10 or 100.")
    usual = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    root = require(root, "root", f"the extracted {usual} folder", usual)
    label_key = "labels" if classes == 10 else "fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    parts = [_batch(root / name, label_key) for name in files]
    meta = safe_load((root / ("batches.meta" if classes == 10 else "meta")).read_bytes(), str(root), arrays=True)
    names = _names(meta["label_names"] if classes == 10 else meta["fine_label_names"])
    images = np.concatenate([data for data, _, _ in parts]).reshape(-1, 3, 32, 32)
    labels = [label for _, batch_labels, _ in parts for label in batch_labels]
    test_count = len(parts[-1][1])
    roles = torch.full((len(labels),), int(Part.TRAIN))
    roles[len(labels) - test_count:] = Part.HELD_OUT
    groups = None
    if classes == 100:  # each fine class's superclass, from the training batch
        coarse_names = _names(meta["coarse_label_names"])
        coarse_of = dict(zip(parts[0][2][label_key], parts[0][2]["coarse_labels"]))
        groups = [coarse_names[coarse_of[c]] for c in range(len(names))]
    return IdentityData(labels=torch.tensor(labels), class_names=names, source=str(root), parts=roles, groups=groups,
                        benchmark=f"cifar{classes}",
                        images=TensorImages(torch.from_numpy(np.ascontiguousarray(images))))


def read_idx(path: Path, dims: int) -> np.ndarray:
    """An MNIST idx file of unsigned bytes with ``dims`` dimensions (``.gz`` read as well)."""
    opened = gzip.open if path.suffix == ".gz" else open
    with opened(path, "rb") as file:
        data = file.read()
    if len(data) < 4 + 4 * dims or data[:2] != b"\0\0" or data[2] != 0x08 or data[3] != dims:
        raise DataError(f"{path}: not an idx file of unsigned bytes with {dims} dimensions (magic {data[:4].hex()}).")
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise DataError(f"{path}: the header says {shape} ({int(np.prod(shape))} bytes) but {body.size} follow: the "
                        "file is truncated.")
    return body.reshape(shape)


def read_mnist(root: str | None = None) -> IdentityData:
    root = require(root, "root", "the folder holding MNIST's idx files", "MNIST/raw")

    def find(stem: str) -> Path:
        for name in (stem, stem + ".gz"):
            if (root / name).is_file():
                return root / name
        raise FileNotFoundError(f"{root / stem} (or .gz) does not exist: data.root must hold MNIST's four idx files.")

    parts = [(read_idx(find(f"{p}-images-idx3-ubyte"), 3), read_idx(find(f"{p}-labels-idx1-ubyte"), 1))
             for p in ("train", "t10k")]
    for images, labels in parts:
        if len(images) != len(labels) or labels.max() > 9:
            raise DataError(f"{root}: {len(images)} images for {len(labels)} labels (or labels past 9).")
    images = np.concatenate([i for i, _ in parts])
    roles = torch.full((len(images),), int(Part.TRAIN))
    roles[len(parts[0][0]):] = Part.HELD_OUT
    pixels = torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1).contiguous()
    return IdentityData(labels=torch.from_numpy(np.concatenate([lab for _, lab in parts]).astype(np.int64)),
                        class_names=[str(d) for d in range(10)], images=TensorImages(pixels), source=str(root),
                        parts=roles, benchmark="mnist")
