"""Nearest neighbours in an ``embeddings.npz`` written by ``embed.py``:

    python -m doppel.search <run>/embeddings.npz --query face.jpg -k 10
    python -m doppel.search <run>/embeddings.npz --query queries/ -k 5 --backend torch --device cuda

Each query image is embedded as the archive's images were (the same network, transform and mirror fusion,
rebuilt from the settings the archive keeps) and compared by cosine similarity with every readable row; the
``k`` most similar rows are printed with their identity and image (from ``index.csv`` beside the archive).
The search is exact and goes through the rows in chunks, each searched by faiss's flat inner-product index when
faiss is installed (``pip install -e ".[search]"``), otherwise by torch; both give the same rows. The archive's
embeddings are memory-mapped, not read: memory is a chunk of rows and queries x chunk similarities, whatever the
archive's size (42M x 512 float32 is 86 GB).
"""

from __future__ import annotations

import argparse
import csv
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
CHUNK_ROWS = 2 ** 16


@dataclass
class Archive:
    embeddings: np.ndarray  # float32 [N, D]
    labels: np.ndarray
    class_names: np.ndarray
    readable: np.ndarray
    config: DictConfig
    checkpoint: str
    image_size: int
    flip: bool
    path: Path


def read_archive(path: str | Path) -> Archive:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file: give the embeddings.npz that embed.py wrote.")
    needed = ("embeddings", "labels", "class_names", "readable", "config", "checkpoint", "image_size", "flip")
    with np.load(path, allow_pickle=False) as stored:
        missing = [name for name in needed if name not in stored.files]
        if missing:
            raise ValueError(f"{path} lacks {', '.join(missing)}: it was not written by embed.py.")
        values = {name: stored[name] for name in needed if name != "embeddings"}
    return Archive(stored_array(path, "embeddings"), values["labels"], values["class_names"], values["readable"],
                   OmegaConf.create(str(values["config"])), str(values["checkpoint"]), int(values["image_size"]),
                   bool(values["flip"]), path)


def stored_array(path: Path, name: str) -> np.ndarray:
    """Member ``name`` of an ``.npz`` memory-mapped where it is stored uncompressed (as embed.py writes it),
    else read."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(f"{name}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        with np.load(path, allow_pickle=False) as stored:
            return stored[name]
    with open(path, "rb") as file:
        file.seek(info.header_offset)
        local = file.read(30)  # the member's local header: its name and extra field come next
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        file.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(file)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(file)
        offset = file.tell()
    if fortran or dtype.hasobject:
        raise ValueError(f"{path}: {name} is not a plain C-ordered array; it was not written by embed.py.")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def nearest(gallery: np.ndarray, queries: np.ndarray, k: int, backend: str = "auto", device: str = "cpu",
            readable: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, rows) [Q, k] of the ``k`` rows of ``gallery`` most similar to each query, most similar
    first, among the ``readable`` rows (all by default); unit rows, so similarity is the inner product."""
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"--backend {backend} is not one of auto, faiss, torch.")
    faiss = None
    if backend in ("auto", "faiss"):
        try:
            import faiss
        except ImportError:
            if backend == "faiss":
                raise ImportError("--backend faiss needs faiss: pip install -e \".[search]\" (or faiss-cpu).") from None
    target = torch.device(device)
    query = np.ascontiguousarray(queries, dtype=np.float32)
    query_tensor = torch.from_numpy(query).to(target)
    best = torch.full((len(query), 0), -torch.inf)
    best_rows = torch.zeros((len(query), 0), dtype=torch.long)
    for start in range(0, len(gallery), CHUNK_ROWS):
        block = np.ascontiguousarray(gallery[start:start + CHUNK_ROWS], dtype=np.float32)
        numbers = torch.arange(start, start + len(block))
        if readable is not None:
            kept = readable[start:start + CHUNK_ROWS]
            block, numbers = block[kept], numbers[torch.from_numpy(kept)]
        wanted = min(k, len(block))
        if wanted == 0:
            continue
        if faiss is not None:
            index = faiss.IndexFlatIP(block.shape[1])
            index.add(block)
            scores, rows = (torch.from_numpy(a) for a in index.search(query, wanted))
        else:
            scores, rows = (query_tensor @ torch.from_numpy(block).to(target).T).topk(wanted, dim=1)
            scores, rows = scores.cpu(), rows.cpu()
        merged = torch.cat([best, scores], dim=1)
        merged_rows = torch.cat([best_rows, numbers[rows.long()]], dim=1)
        best, picked = merged.topk(min(k, merged.shape[1]), dim=1)
        best_rows = merged_rows.gather(1, picked)
    return best.numpy(), best_rows.numpy()


def query_files(query: str) -> list[Path]:
    path = Path(query).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise FileNotFoundError(f"--query {query}: the folder holds no image ({suffixes}).")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"--query {query} is neither an image file nor a folder of images.")
    return [path]


def embed_queries(archive: Archive, files: list[Path], device: str = "cpu") -> np.ndarray:
    """The queries embedded by the archive's network, transform and mirror fusion."""
    from doppel.data.dataset import decode
    from doppel.data.transforms import ImageTransform
    from doppel.embed import embed_images
    from doppel.evaluate import build_network, run_checkpoint

    cfg = archive.config
    checkpoint = run_checkpoint(archive.checkpoint) if archive.checkpoint else None
    backbone = build_network(cfg, checkpoint, archive.checkpoint or None, archive.image_size).to(device)
    transform = ImageTransform(cfg.data.get("resize"), cfg.data.get("crop"))
    rows = []
    with torch.no_grad():
        for file in files:  # one at a time: query images need not share a size
            image = transform(decode(file.read_bytes(), str(file)), None)
            rows.append(embed_images(backbone, image[None].to(device), archive.flip).cpu())
    return torch.cat(rows).numpy()


def index_lines(index: Path, wanted: set[int]) -> dict[int, list[str]]:
    """The ``index.csv`` lines of the ``wanted`` rows (one pass; the file may hold millions)."""
    found: dict[int, list[str]] = {}
    if not index.is_file():
        return found
    with open(index, newline="", encoding="utf-8") as file:
        reader = csv.reader(file)
        next(reader, None)
        for line in reader:
            if int(line[0]) in wanted:
                found[int(line[0])] = line
                if len(found) == len(wanted):
                    break
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m doppel.search", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archive", help="embeddings.npz written by embed.py")
    parser.add_argument("--query", required=True, help="an image file or a folder of images")
    parser.add_argument("-k", type=int, default=10, help="neighbours per query (default 10)")
    parser.add_argument("--backend", default="auto", help="auto (faiss when installed) | faiss | torch")
    parser.add_argument("--device", default="cpu", help="where the queries are embedded (and torch searches)")
    args = parser.parse_args(argv)
    if args.k < 1:
        parser.error(f"-k {args.k} must be at least 1.")
    try:
        archive = read_archive(args.archive)
        files = query_files(args.query)
        queries = embed_queries(archive, files, args.device)
        similarities, rows = nearest(archive.embeddings, queries, args.k, args.backend, args.device,
                                     archive.readable)
    except (OSError, ValueError, ImportError) as error:
        print(f"Error: {error}", file=sys.stderr)
        return 1
    lines = index_lines(archive.path.with_name("index.csv"), set(rows.reshape(-1).tolist()))
    for file, found, scores in zip(files, rows, similarities):
        print(f"{file}:")
        for rank, (row, score) in enumerate(zip(found, scores), 1):
            name = archive.class_names[archive.labels[row]]
            image = lines[row][3] if row in lines else "-"
            print(f"  {rank:>3}  {score:.4f}  {name}  row {row}  {image}")  # names may hold spaces
    return 0


if __name__ == "__main__":
    sys.exit(main())
