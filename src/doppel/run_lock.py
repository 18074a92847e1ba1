"""One run per run directory at a time.

Two runs started in one directory would write one ``metrics.csv`` and ``config.yaml`` over the other's.
``train()`` holds an exclusive ``flock`` on ``<run>/.doppel.lock`` while it runs: a second run there
stops at once with a sentence. The kernel drops the lock when its process ends, however it ends
(``kill -9``, a node lost), so a requeued SLURM job takes over the directory of the job it continues.
Only process 0 takes it (the other processes of a DDP run share the directory).
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_only

LOCK = ".doppel.lock"


class RunDirectoryBusy(RuntimeError):
    """Another live run holds the run directory."""


@contextmanager
def run_lock(folder: Path) -> Iterator[None]:
    if rank_zero_only.rank != 0:
        yield
        return
    with open(folder / LOCK, "a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            raise RunDirectoryBusy(f"{folder} is in use by another run ({holder}): give this run its own directory "
                                   "(hydra.run.dir=...), or wait for that one to end.") from None
        file.seek(0)
        file.truncate()
        file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        try:
            yield
        finally:
            fcntl.flock(file, fcntl.LOCK_UN)
