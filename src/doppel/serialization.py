"""Reading and writing tensor files safely: nothing in a file is run, and no kill leaves a broken file.

Reading is ``torch.load(weights_only=True)``: tensors and plain data only (a file that holds other Python
objects is refused unread), with one sentence for every way a file can be unfit. Writing goes to a
temporary file in the same folder, flushed to disk, then renamed over the target: a kill at any moment
leaves either the previous file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import resource
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the reason and what to do."""


# How a torch.save file begins: a zip archive, or (before torch 1.6) torch's magic number pickled.
_ZIP = b"PK\x03\x04"
_LEGACY = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=2)[:-1]


def load_checkpoint(path: str | Path, key: str = "ckpt_path", mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU; ``key`` is the setting that named the file;
    ``mmap``: tensors memory-mapped from the file (only the rows read are paged in).

    A file that does not begin as torch.save files do never reaches the unpickler.
    """
    path = Path(path)
    name = f"{key}={str(path)!r}"
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY))
    except FileNotFoundError:
        raise FileNotFoundError(f"{name} does not exist.") from None
    if not head:
        raise CheckpointError(f"{name} is empty: the run that wrote it was killed while creating it; use an "
                              "earlier checkpoint or start anew.")
    if not head.startswith((_ZIP, _LEGACY)):
        if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # pickle's PROTO opcode
            raise CheckpointError(f"{name} is a plain Python pickle, not a torch.save checkpoint: refused unread "
                                  "(unpickling can run code); nothing in it was run.")
        raise CheckpointError(f"{name} is not a PyTorch checkpoint (its bytes are not a torch.save archive): "
                              "it is another kind of file or corrupt.")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused:
            raise CheckpointError(
                f"{name} holds Python objects, not only tensors and plain data (loading it would call "
                f"{refused.group(1)}): refused, nothing in it was run. Doppel's checkpoints hold none; the file "
                "was written by other code (e.g. a whole pickled model) or altered.") from None
        raise CheckpointError(f"{name} is corrupt or holds content the safe loader refuses: nothing in it was "
                              "run; use an earlier checkpoint or start anew.") from None
    except Exception as error:  # a damaged archive fails in many ways
        reason = str(error).split(".")[0] or type(error).__name__
        raise CheckpointError(f"{name} is truncated or corrupt ({reason}): use an earlier checkpoint or start "
                              "anew.") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{name} holds a {type(checkpoint).__name__}, not a training checkpoint.")
    return checkpoint


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the file and the cause."""


def check_writable(folder: Path, size: int) -> None:
    """Before training: ``folder`` takes a file of ``size`` bytes (a test write, the free space for it and
    the file being replaced, the process's file-size limit), or one sentence says why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}.tmp"
        probe.write_bytes(b"0")
        probe.unlink()
    except OSError as error:
        raise CheckpointWriteError(f"checkpoints cannot be written to {folder} ({error.strerror}): make it writable "
                                   "or choose another run directory (hydra.run.dir=...).") from None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and limit < size:
        raise CheckpointWriteError(f"a checkpoint of this run takes about {size} bytes and this process may write "
                                   f"files of at most {limit} bytes (ulimit -f): raise the limit.")
    free = shutil.disk_usage(folder).free
    if free < 2 * size:  # the new file beside the one it replaces
        raise CheckpointWriteError(f"{folder} has {free} bytes free; a checkpoint of this run needs about "
                                   f"{2 * size} (the new file beside the previous one): free space or choose "
                                   "another run directory.")


def _write_failure(path: Path, error: BaseException) -> str:
    """Why writing ``path`` failed, in words (torch reports a full disk as an 'enforce fail' line)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    free = shutil.disk_usage(path.parent).free
    if free < 2**20:
        return f"the disk is full ({free} bytes free)"
    if limit != resource.RLIM_INFINITY:
        return f"the write stopped; the process's file-size limit is {limit} bytes (ulimit -f)"
    return f"the write failed: {str(error).splitlines()[0][:200]}"


def atomic_save(checkpoint: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, rename over ``path`` (atomic on POSIX).
    A write that fails leaves ``path`` as it was and raises :class:`CheckpointWriteError` naming the cause."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A new name beside the target; mode 0o666 under the process's umask, as any new file.
    temporary = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as error:
        raise CheckpointWriteError(f"could not write {path}: {_write_failure(path, error)}.") from error
    try:
        with os.fdopen(descriptor, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, (OSError, RuntimeError)):
            raise CheckpointWriteError(f"could not write {path}: {_write_failure(path, error)}.") from error
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself reaches the disk
    finally:
        os.close(folder)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer that was killed
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()
