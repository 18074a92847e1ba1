"""Small datasets written by the tests in each on-disk format, from one set of synthetic identities."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def identities(n_classes: int = 20, per_class: int = 4, size: int = 16, seed: int = 0) -> list[list[torch.Tensor]]:
    """Per class, ``per_class`` uint8 [3, size, size] images: a coarse colour pattern under noise."""
    rng = np.random.default_rng(seed)
    classes = []
    for _ in range(n_classes):
        pattern = rng.normal(0, 50, (3, 4, 4)).repeat(size // 4, 1).repeat(size // 4, 2)
        classes.append([torch.from_numpy(np.clip(128 + pattern + rng.normal(0, 30, (3, size, size)), 0, 255)
                                         .astype(np.uint8)) for _ in range(per_class)])
    return classes


def encode(image: torch.Tensor, kind: str = "png") -> bytes:
    """uint8 [3, H, W] -> PNG (lossless) or JPEG (quality 95) bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "PNG" if kind == "png" else "JPEG", quality=95)
    return buffer.getvalue()


def write_folder(root: Path, classes: list[list[torch.Tensor]], kind: str = "png") -> Path:
    for c, images in enumerate(classes):
        (root / f"id{c:03d}").mkdir(parents=True)
        for i, image in enumerate(images):
            (root / f"id{c:03d}" / f"{i:02d}.{kind}").write_bytes(encode(image, kind))
    return root


def varied(image: torch.Tensor, index: int) -> torch.Tensor:
    """The image padded to a size that varies with ``index`` (benchmarks' photos differ in size)."""
    return torch.nn.functional.pad(image, (0, index % 3 * 2, 0, index % 2 * 4), mode="replicate")


def write_cub(root: Path, classes: list[list[torch.Tensor]]) -> Path:
    """CUB-200-2011's layout; class c of ``classes`` is CUB class c + 1 (the first 100 train)."""
    images, labels, names, number = [], [], [], 1
    for c, pictures in enumerate(classes):
        folder = f"{c + 1:03d}.Bird_{c}"
        names.append(f"{c + 1} {folder}")
        (root / "images" / folder).mkdir(parents=True)
        for i, image in enumerate(pictures):
            (root / "images" / folder / f"bird_{i}.jpg").write_bytes(encode(varied(image, i), "jpg"))
            images.append(f"{number} {folder}/bird_{i}.jpg")
            labels.append(f"{number} {c + 1}")
            number += 1
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("classes.txt", names)):
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def write_cars(root: Path, classes: list[list[torch.Tensor]]) -> Path:
    from scipy.io import savemat

    (root / "car_ims").mkdir(parents=True)
    records, number = [], 1
    for c, pictures in enumerate(classes):
        for i, image in enumerate(pictures):
            name = f"car_ims/{number:06d}.jpg"
            (root / name).write_bytes(encode(varied(image, i), "jpg"))
            records.append((name, 1, 1, 10, 10, c + 1, 0))
            number += 1
    dtype = [("relative_im_path", "O"), ("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
             ("class", "O"), ("test", "O")]
    annotations = np.array([records], dtype=dtype)
    names = np.array([f"Car {c + 1}" for c in range(len(classes))], dtype=object)
    savemat(root / "cars_annos.mat", {"annotations": annotations, "class_names": names[None]})
    return root


def write_sop(root: Path, classes: list[list[torch.Tensor]], train_classes: int) -> Path:
    files = {True: ["image_id class_id super_class_id path"], False: ["image_id class_id super_class_id path"]}
    number = 1
    for c, pictures in enumerate(classes):
        folder = root / f"group{c % 3}_final"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(pictures):
            (folder / f"{c}_{i}.JPG").write_bytes(encode(varied(image, i), "jpg"))
            files[c < train_classes].append(f"{number} {c + 1} {c % 3 + 1} {folder.name}/{c}_{i}.JPG")
            number += 1
    (root / "Ebay_train.txt").write_text("\n".join(files[True]) + "\n")
    (root / "Ebay_test.txt").write_text("\n".join(files[False]) + "\n")
    return root


def write_inshop(root: Path, classes: list[list[torch.Tensor]], train_classes: int) -> Path:
    rows = []
    for c, pictures in enumerate(classes):
        folder = root / "img" / "WOMEN" / "Dresses" / f"id_{c:08d}"
        folder.mkdir(parents=True)
        for i, image in enumerate(pictures):
            (folder / f"{i:02d}_1_front.jpg").write_bytes(encode(varied(image, i), "jpg"))
            status = "train" if c < train_classes else ("query" if i % 2 else "gallery")
            rows.append(f"img/WOMEN/Dresses/id_{c:08d}/{i:02d}_1_front.jpg  id_{c:08d}  {status}")
    (root / "list_eval_partition.txt").write_text(f"{len(rows)}\nimage_name item_id evaluation_status\n"
                                                  + "\n".join(rows) + "\n")
    return root


def write_cifar(root: Path, classes: list[list[torch.Tensor]], hundred: bool = False) -> Path:
    """CIFAR python batches: pickled dicts with bytes keys and a uint8 [N, 3072] array (protocol 2)."""
    import pickle

    root.mkdir(parents=True)
    pairs = [(c, image) for c, pictures in enumerate(classes) for image in pictures]
    train, test = [p for i, p in enumerate(pairs) if i % 4], [p for i, p in enumerate(pairs) if not i % 4]
    key = b"fine_labels" if hundred else b"labels"

    def batch(part):
        data = np.stack([image.numpy().reshape(-1) for _, image in part]).astype(np.uint8)
        content = {b"batch_label": b"batch", key: [c for c, _ in part], b"data": data,
                   b"filenames": [f"{i}.png".encode() for i in range(len(part))]}
        if hundred:
            content[b"coarse_labels"] = [c % 4 for c, _ in part]
        return pickle.dumps(content, protocol=2)

    names = [f"class{c}".encode() for c in range(len(classes))]
    if hundred:
        (root / "train").write_bytes(batch(train))
        (root / "test").write_bytes(batch(test))
        (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": names,
                                                  b"coarse_label_names": [b"a", b"b", b"c", b"d"]}, protocol=2))
    else:
        for i in range(5):
            (root / f"data_batch_{i + 1}").write_bytes(batch(train[i::5]))
        (root / "test_batch").write_bytes(batch(test))
        (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}, protocol=2))
    return root


def write_mnist(root: Path, classes: list[list[torch.Tensor]], gz: bool = True) -> Path:
    import gzip
    import struct

    root.mkdir(parents=True)
    pairs = [(c, image[0]) for c, pictures in enumerate(classes) for image in pictures]
    for prefix, part in (("train", [p for i, p in enumerate(pairs) if i % 4]),
                         ("t10k", [p for i, p in enumerate(pairs) if not i % 4])):
        size = part[0][1].shape
        images = struct.pack(">IIII", 0x803, len(part), *size) + b"".join(i.numpy().tobytes() for _, i in part)
        labels = struct.pack(">II", 0x801, len(part)) + bytes(c for c, _ in part)
        for name, data in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            if gz:
                (root / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root


def write_mslowshot(root: Path, classes: list[list[torch.Tensor]], n_base: int) -> Path:
    """TrainData_Base.tsv (all but the last image of the first ``n_base`` classes), TrainData_lowshot.tsv
    (the first image of the others) and DevSet.tsv (the rest, with the Base / Novel flag)."""
    import base64

    root.mkdir(parents=True)
    files: dict[str, list[str]] = {"TrainData_Base.tsv": [], "TrainData_lowshot.tsv": [], "DevSet.tsv": []}
    for c, pictures in enumerate(classes):
        for i, image in enumerate(pictures):
            novel = c >= n_base
            name = ("TrainData_lowshot.tsv" if i == 0 else "DevSet.tsv") if novel else \
                ("DevSet.tsv" if i == len(pictures) - 1 else "TrainData_Base.tsv")
            fields = [f"img{c}-{i}", base64.b64encode(encode(image, "jpg")).decode(), f"m.0{c:04x}", str(i + 1),
                      f"http://example.com/{c}/{i}.jpg"]
            if name == "DevSet.tsv":
                fields.append("Novel" if novel else "Base")
            files[name].append("\t".join(fields))
    for name, lines in files.items():
        (root / name).write_text("\r\n".join(lines) + "\r\n")  # the files' Windows line ends
    return root


def write_pack(path: Path, classes: list[list[torch.Tensor]]) -> Path:
    """An InsightFace verification pack of 20 'same' pairs (one image twice) and 20 'different' pairs."""
    from doppel.data.readers.verification_bin import write_verification_bin

    images, issame = [], []
    for c in range(20):
        images += [encode(classes[c][3]), encode(classes[c][3]), encode(classes[c][2]),
                   encode(classes[(c + 3) % 20][2])]
        issame += [True, False]
    write_verification_bin(path, images, issame)
    return path
