"""MS-Celeb-1M low-shot TSV files, the Doppelganger paper's data (``data=mslowshot``).

Each line is one aligned face, 5 tab-separated columns: ImageID, FaceData_Base64Encoded, FreebaseMID,
ImageSearchRank, ImageURL. ``TrainData_Base.tsv`` (20k base identities, 22 GB) is trained on;
``TrainData_lowshot.tsv`` holds the novel identities' one-shot images (their prototypes); a development
file in the same layout (optionally a 6th column ``Base`` / ``Novel``) gives the queries: a base MID's
images are base queries, a novel MID's are novel queries. The files are streamed: one pass records each
line's byte offset and MID (cached beside the file when its folder is writable), then a face is read by
offset and base64-decoded in the workers; no file is ever held in memory.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import numpy as np
import torch

from doppel.data.dataset import DataError, EncodedImages, IdentityData, Part, require

CHUNK = 1 << 24


def index_lines(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """(offsets, lengths, MIDs, flags) of every non-empty line, in one streaming pass (or from the cache)."""
    cache = path.with_name(path.name + ".doppel-index.npz")
    stat = path.stat()
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as saved:
            if int(saved["size"]) == stat.st_size and int(saved["mtime_ns"]) == stat.st_mtime_ns:
                return saved["offsets"], saved["lengths"], saved["mids"].tolist(), saved["flags"].tolist()
    offsets, lengths, mids, flags = [], [], [], []
    with open(path, "rb") as file:
        position, rest = 0, b""
        while True:
            chunk = file.read(CHUNK)
            data = rest + chunk
            lines = data.split(b"\n")
            rest = lines.pop() if chunk else b""
            for line in lines:
                if line.strip():
                    fields = line.rstrip(b"\r").split(b"\t")
                    if len(fields) < 5:
                        raise DataError(f"{path}, line {len(offsets) + 1}: {len(fields)} tab-separated columns, 5 "
                                        "expected (ImageID, FaceData_Base64Encoded, FreebaseMID, ImageSearchRank, "
                                        "ImageURL).")
                    offsets.append(position)
                    lengths.append(len(line))
                    mids.append(fields[2].decode())
                    flags.append(fields[5].decode().strip().lower() if len(fields) > 5 else "")
                position += len(line) + 1
            if not chunk:
                break
    index = (np.asarray(offsets, np.int64), np.asarray(lengths, np.int64), mids, flags)
    if os.access(path.parent, os.W_OK):
        np.savez(cache, offsets=index[0], lengths=index[1], mids=np.asarray(mids), flags=np.asarray(flags),
                 size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return index


class TsvFaces(EncodedImages):
    """Faces of several TSV files, by (file, offset, length)."""

    def __init__(self, files: list[Path], file_of: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> None:
        self.files, self.file_of, self.offsets, self.lengths = files, file_of, offsets, lengths
        self._fds: dict[int, int] = {}
        self._pid = -1

    def __len__(self) -> int:
        return len(self.offsets)

    def name(self, index: int) -> str:
        return f"{self.files[self.file_of[index]]} line at byte {self.offsets[index]}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}, "_pid": -1}

    def fetch(self, index: int) -> bytes:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        file = int(self.file_of[index])
        if file not in self._fds:
            self._fds[file] = os.open(self.files[file], os.O_RDONLY)
        line = os.pread(self._fds[file], int(self.lengths[index]), int(self.offsets[index]))
        try:
            return base64.b64decode(line.split(b"\t", 2)[1], validate=True)
        except (IndexError, binascii.Error):
            raise DataError(f"{self.name(index)}: the FaceData column is not base64: the file changed since it was "
                            "indexed, or is damaged (delete its .doppel-index.npz to re-index).") from None


def read_mslowshot(root: str | None = None, base: str = "TrainData_Base.tsv", lowshot: str = "TrainData_lowshot.tsv",
                   dev: str | None = None) -> IdentityData:
    """``root``: the folder of the TSV files; ``base`` / ``lowshot`` / ``dev``: their names in it (``dev``
    null: no queries, so no evaluation)."""
    root = require(root, "root", "the folder holding TrainData_Base.tsv and TrainData_lowshot.tsv", "MS-Celeb-1M")
    names = [("base", base), ("lowshot", lowshot)] + ([("dev", dev)] if dev else [])
    files, parts = [], []
    for key, name in names:
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"data.{key}: {str(path)!r} does not exist; data.root must hold the low-shot "
                                    "TSV files (docs/data.md).")
        files.append(path)
        parts.append(index_lines(path))
    base_mids, novel_mids = sorted(set(parts[0][2])), sorted(set(parts[1][2]) - set(parts[0][2]))
    if set(parts[1][2]) & set(base_mids):
        shared = sorted(set(parts[1][2]) & set(base_mids))
        raise DataError(f"{files[1]}: {len(shared)} MIDs (e.g. {shared[0]}) are also base identities in {files[0]}; "
                        "the novel set must hold other identities.")
    class_of = {mid: i for i, mid in enumerate(base_mids + novel_mids)}
    labels, roles = [], []
    for number, (_, _, mids, flags) in enumerate(parts):
        for mid, flag in zip(mids, flags):
            if mid not in class_of:
                raise DataError(f"{files[number]}: MID {mid} is in neither the base nor the low-shot file.")
            novel = class_of[mid] >= len(base_mids)
            if flag and flag != ("novel" if novel else "base"):
                raise DataError(f"{files[number]}: MID {mid} is flagged {flag!r} but is a "
                                f"{'novel' if novel else 'base'} identity.")
            labels.append(class_of[mid])
            roles.append([Part.TRAIN, Part.REFERENCE, Part.QUERY if novel else Part.HELD_OUT][number])
    file_of = np.concatenate([np.full(len(p[0]), i) for i, p in enumerate(parts)])
    faces = TsvFaces(files, file_of, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return IdentityData(labels=torch.tensor(labels), class_names=base_mids + novel_mids, images=faces,
                        source=str(root), parts=torch.tensor([int(r) for r in roles]))
