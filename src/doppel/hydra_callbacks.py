"""Hydra callbacks: checks that must run before Hydra itself writes into the run directory.

Hydra creates the run directory and opens its log file there before ``train()`` runs, and an unwritable
directory then fails inside Hydra's logging set-up with a traceback. This check runs first and says so in
one sentence.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def check_run_dir(folder: Path, key: str) -> None:
    """``folder`` exists as a writable folder, or can be created (its nearest existing parent is one)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{key}={str(folder)!r} cannot be created: {str(existing)!r} is a file, not a folder; "
                         f"choose another run directory ({key}=...).")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={str(folder)!r} is not writable ({str(existing)!r} is read-only for this user); "
                         f"choose another run directory ({key}=...).")


class CheckRunDir(Callback):
    """Hydra turns a callback's exception into a warning and goes on; this one ends the command (exit 1)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(Path(config.hydra.sweep.dir), "hydra.sweep.dir")

    @staticmethod
    def _check(folder: Path, key: str) -> None:
        try:
            check_run_dir(folder, key)
        except ValueError as error:
            raise SystemExit(f"Error: {error}") from None
