"""A reader's per-image arrays (labels, offsets) kept beside the data as ``.npy`` files and memory-mapped.

Built once, by one process at a time (a file lock; the others wait and map what it wrote), written to a
temporary folder and renamed into place (a reader never sees half a cache), and rebuilt when a source file
changes (its size or modification time differs from the stamp). Every rank and DataLoader worker on a node
then maps the same files: the page cache holds one copy per node, and start-up reads no text. Loading never
executes code (``allow_pickle=False``).

``data.index_cache``: ``auto`` (a folder ``<source>.doppel-cache`` beside the source, or under
``$XDG_CACHE_HOME/doppel`` (``~/.cache/doppel``) when the source's folder is read-only), a folder of your
choice, or ``off`` (parse in memory every time).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import shutil
import socket
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

VERSION = 1
STAMP = "stamp.json"


def cache_folder(setting: str | None, source: Path) -> Path | None:
    """Where the cache of ``source`` lives for the ``data.index_cache`` setting (None: no cache)."""
    if setting in (None, False, "off"):
        return None
    name = f"{source.name}.doppel-cache"
    if setting == "auto":
        if os.access(source.parent, os.W_OK):
            return source.parent / name
        home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "doppel"
        return home / f"{_digest(source)}-{name}"
    return Path(setting) / f"{_digest(source)}-{name}"


def _digest(source: Path) -> str:
    return hashlib.sha256(str(source.resolve()).encode()).hexdigest()[:16]


def _stamp(sources: list[Path]) -> dict:
    stats = [(path, path.stat()) for path in sources]
    return {"version": VERSION, "sources": [{"path": str(path.resolve()), "size": stat.st_size,
                                             "mtime_ns": stat.st_mtime_ns} for path, stat in stats]}


def _load(folder: Path, stamp: dict) -> dict[str, np.ndarray] | None:
    """The cached arrays, mapped copy-on-write (torch can wrap them; nothing is written back), or None when the
    cache is missing, stale or damaged."""
    try:
        written = json.loads((folder / STAMP).read_text())
        if {k: written.get(k) for k in stamp} != stamp:
            return None
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="c", allow_pickle=False)
                  for name in written["lengths"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if any(len(arrays[name]) != length for name, length in written["lengths"].items()):
        return None
    return arrays


@contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """One builder at a time; a file system without ``flock`` builds without it (the rename keeps that safe)."""
    with open(lock, "a") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def cached_arrays(setting: str | None, key: str, sources: list[Path],
                  build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """``build()``'s arrays, from the cache when one is valid for ``sources`` (``key``: the setting's name,
    for messages); the first source names the cache."""
    folder = cache_folder(setting, sources[0])
    if folder is None:
        return build()
    stamp = _stamp(sources)
    found = _load(folder, stamp)
    if found is not None:
        return found
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive(folder.parent / f".{folder.name}.lock"):
            found = _load(folder, stamp)  # another process built it while this one waited
            if found is not None:
                return found
            arrays = build()
            _write(folder, stamp, arrays)
    except OSError as error:
        if setting != "auto":
            raise OSError(f"{key}={setting!r}: cannot write the index cache there ({error}); give a writable "
                          f"folder, or {key}=off to parse the index in memory on every start.") from error
        warnings.warn(f"{key}=auto: cannot write the index cache at {folder} ({error}); every start parses "
                      f"{sources[0]} in memory. Set {key} to a writable folder.", stacklevel=2)
        return build()
    found = _load(folder, stamp)  # mapped: the built arrays' memory goes back once they are dropped
    if found is None:
        warnings.warn(f"{folder}: the index cache just written does not read back (a full file system, or another "
                      "node replacing it); this start uses what it parsed.", stacklevel=2)
        return arrays
    return found


def _write(folder: Path, stamp: dict, arrays: dict[str, np.ndarray]) -> None:
    building = folder.parent / f".{folder.name}.{socket.gethostname()}.{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    try:
        for name, array in arrays.items():
            np.save(building / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        (building / STAMP).write_text(json.dumps({**stamp, "lengths": {n: len(a) for n, a in arrays.items()}}))
        if folder.exists():
            if _load(folder, stamp) is not None:  # another node built it meanwhile (no flock across nodes)
                return
            shutil.rmtree(folder)  # stale: processes that mapped its files keep them until they unmap
        try:
            os.rename(building, folder)
        except OSError:
            if _load(folder, stamp) is None:  # not someone else's valid cache renamed in first
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)


def mapped_state(array: np.ndarray) -> object:
    """What to pickle for ``array``: a memory-mapped array as its file (a spawned worker maps it again rather
    than receiving a copy of its bytes), any other array as itself."""
    if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap):  # the whole file, not a slice
        return ("mapped", array.filename, array.offset, array.dtype.str, array.shape)
    return array


def from_mapped_state(state: object) -> np.ndarray:
    if isinstance(state, tuple) and state[0] == "mapped":
        _, filename, offset, dtype, shape = state
        return np.memmap(filename, np.dtype(dtype), mode="c", offset=offset, shape=shape)
    return state
