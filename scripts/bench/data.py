"""Decoded images per second per DataLoader worker, per on-disk format, against raw decoding.

The same 112x112 JPEG faces are written in each format (an image folder, a CSV manifest, a RecordIO
pack, a verification .bin); each is read through Doppel's DataModule path (reader, decode, collate) by a
DataLoader with 1 and 2 workers, after a warm-up pass (workers started, files in the page cache). The
baseline, measured in the same run: the same JPEG bytes already in memory, decoded in a loop in this
process: the limit of one core of this machine. Ratios are images per second per worker over it.

    python scripts/bench/data.py                 # 3000 images, 1 and 2 workers
    python scripts/bench/data.py --images 10000 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from doppel.data.datamodule import IdentityDataModule, collate
from doppel.data.dataset import decode
from doppel.data.readers.recordio import write_recordio
from doppel.data.readers.verification_bin import read_verification_bin, write_verification_bin


def faces(count: int, per_class: int, seed: int = 0) -> list[bytes]:
    """Face-like JPEGs: a smooth per-class pattern plus noise, quality 90 (what aligned face packs hold)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        if i % per_class == 0:
            pattern = rng.normal(128, 40, (3, 7, 7, 3)).clip(0, 255)
        small = pattern[i % 3] + rng.normal(0, 8, (7, 7, 3))
        image = Image.fromarray(small.clip(0, 255).astype(np.uint8)).resize((112, 112), Image.BICUBIC)
        pixels = np.asarray(image).astype(np.float32) + rng.normal(0, 6, (112, 112, 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def raw_decode_rate(images: list[bytes], seconds: float = 3.0) -> float:
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for data in images[:500]:
            decode(data, "bench")
        done += 500
    return done / (time.perf_counter() - start)


def write_formats(folder: Path, images: list[bytes], per_class: int) -> dict[str, dict]:
    classes = [images[i:i + per_class] for i in range(0, len(images), per_class)]
    for c, members in enumerate(classes):
        (folder / "faces" / f"id{c:05d}").mkdir(parents=True)
        for i, data in enumerate(members):
            (folder / "faces" / f"id{c:05d}" / f"{i}.jpg").write_bytes(data)
    rows = [f"faces/id{c:05d}/{i}.jpg,{c}" for c, members in enumerate(classes) for i in range(len(members))]
    (folder / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    write_recordio(folder / "train.rec", enumerate(classes))
    write_verification_bin(folder / "pairs.bin", images[: len(images) // 2 * 2], [True] * (len(images) // 2))
    base = {"novel_fraction": 0.0, "base_queries": False}
    return {"folder": {"reader": "doppel.data.readers.folder.read_folder", "root": str(folder / "faces"), **base},
            "csv": {"reader": "doppel.data.readers.csv_manifest.read_csv", "path": str(folder / "list.csv"), **base},
            "recordio": {"reader": "doppel.data.readers.recordio.read_recordio", "root": str(folder / "train.rec"),
                         **base},
            "verification .bin": {"pairs": str(folder / "pairs.bin")}}


class _Constant(torch.utils.data.Dataset):
    """One decoded face, copied per item: what the DataLoader's machinery alone costs (no file, no decode)."""

    def __init__(self, image: torch.Tensor, count: int) -> None:
        self.image, self.count = image, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        return self.image.clone(), index


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, path: str) -> None:
        self.pack = read_verification_bin(path)

    def __len__(self) -> int:
        return len(self.pack.images)

    def __getitem__(self, index: int):
        return self.pack.images[index], index


def dataset_of(settings: dict):
    if "pairs" in settings:
        return _Pairs(settings["pairs"])
    module = IdentityDataModule(**settings)
    module.setup()
    return module._dataset(torch.arange(len(module.split.index)), train=False)


def loader_rate(dataset, workers: int, batch_size: int = 128) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        persistent_workers=True)
    for _ in loader:  # warm-up: workers started, files in the page cache
        pass
    start = time.perf_counter()
    count = sum(len(batch[0]) for batch in loader)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512])
    args = parser.parse_args()
    torch.set_num_threads(1)
    images = faces(args.images, args.per_class)
    print(f"{len(images)} JPEGs of 112x112, mean {np.mean([len(b) for b in images]) / 1024:.1f} KiB")
    with tempfile.TemporaryDirectory() as folder:
        formats = write_formats(Path(folder), images, args.per_class)
        raw = raw_decode_rate(images)
        print(f"raw decode (bytes in memory, one process): {raw:.0f} images/s\n")
        constant = _Constant(decode(images[0], "bench"), len(images))
        loader_rate(constant, 1)  # discarded: the first loader of a process runs slower
        for batch_size in args.batch_sizes:
            rate = loader_rate(constant, 1, batch_size)
            print(f"DataLoader alone (a decoded image copied per item), batch {batch_size}, 1 worker: {rate:.0f} "
                  f"images/s = {1e6 / rate:.0f} us per image; with raw decode that bounds the ratio at "
                  f"{(1 / raw) / (1 / raw + 1 / rate):.2f}")
        print()
        print("| format | batch | workers | images/s | per worker | per worker / raw decode |")
        print("|---|---|---|---|---|---|")
        for name, settings in formats.items():
            dataset = dataset_of(settings)
            for batch_size in args.batch_sizes:
                for workers in args.workers:
                    rate = loader_rate(dataset, workers, batch_size)
                    print(f"| {name} | {batch_size} | {workers} | {rate:.0f} | {rate / workers:.0f} | "
                          f"{rate / workers / raw:.2f} |")
        raw_after = raw_decode_rate(images)
        print(f"\nraw decode again at the end: {raw_after:.0f} images/s ({raw_after / raw:.2f} of the first)")


if __name__ == "__main__":
    main()
