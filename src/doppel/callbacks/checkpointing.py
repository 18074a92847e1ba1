"""Lightning callback that keeps ``<run>/checkpoints/last.ckpt`` current, so an interrupted run loses little.

It is written (atomically, see :mod:`doppel.serialization`) every ``every_n_steps`` optimizer steps, at every
epoch end, and when the process receives SIGTERM (a scheduler's preemption or time limit), SIGUSR1 / SIGUSR2
(SLURM's warning before a time limit, which then also requeues the job: :mod:`doppel.slurm`) or SIGINT
(Ctrl-C): training finishes the step it is in (several processes: the steps up to the next sync point,
where they agree), saves, and stops with :class:`RunInterrupted`; a second Ctrl-C stops at once. The save
that ends an epoch's last step waits for the epoch end (after validation), so every checkpoint is taken at
a point a resumed run continues from exactly.

A sharded classifier (``classifier.sharded=true``) is written by every process, its own rows to its own
file in a new folder beside ``last.ckpt`` (``checkpoint.class_shards=true``, :mod:`doppel.checkpoint`):
no process gathers the whole classifier, and the files are written in parallel. Once the new ``last.ckpt``
is in place, the folders of the checkpoints it replaced are removed.
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.utilities import rank_zero_info

from doppel.checkpoint import LAST, SHARD_REQUEST, new_shard_folder, remove_stale_class_shards
from doppel.host_syncs import at_sync_point
from doppel.serialization import CheckpointError, CheckpointWriteError, load_checkpoint
from doppel.slurm import REQUEUE_SIGNALS, requeue


class RunInterrupted(Exception):
    """Training stopped on a signal after saving the checkpoint to resume from."""

    def __init__(self, signum: int, step: int, path: Path) -> None:
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"interrupted by {signal.Signals(signum).name} at step {step}: saved {path}; "
                         f"resume it with: {resume_command(path.parent.parent)}")


def resume_command(run_dir: Path) -> str:
    """The command line that resumes the run in ``run_dir``: this one's, with its folder and ckpt_path=auto."""
    kept = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "ckpt_path=", "hydra.output_subdir="))]
    return shlex.join(["python", Path(sys.argv[0]).name, *kept, f"hydra.run.dir={run_dir}", "ckpt_path=auto"])


class LastCheckpoint(Checkpoint):
    def __init__(self, dirpath: str | Path, every_n_steps: int | None = 500, class_shards: bool = True) -> None:
        self.path = Path(dirpath) / LAST
        self.every_n_steps = every_n_steps
        self.class_shards = class_shards  # a sharded classifier written per process (else gathered into one)
        self._shard_folder: dict[str, str] | None = None  # where the save in progress puts class shards
        self._received: int | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._saved: tuple[int | None, int] | None = None  # (the signal that asked to stop, the step saved)

    # -- signals ------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed here, after Lightning installs its own SIGTERM handler, so that this one decides.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT, *REQUEUE_SIGNALS):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self._received is not None and signum == signal.SIGINT:
            self._restore_handlers()
            raise KeyboardInterrupt  # the second Ctrl-C: stop without waiting for the step
        self._received = signum
        rank_zero_info(f"\n{signal.Signals(signum).name} received: saving a checkpoint at the end of this step, "
                       "then stopping (Ctrl-C again to stop at once).")

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()
        self._after_save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def _stop_requested(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                        epoch_end: bool = False) -> int | None:
        """The signal that asks this run to stop; under DDP every process agrees (a signal to any one stops
        all), at the run's sync points and epoch ends only: agreeing costs a wait for the device."""
        if trainer.world_size == 1:
            return self._received
        if not epoch_end and not at_sync_point(trainer):
            return None
        received = torch.tensor([self._received or 0], device=pl_module.device)
        torch.distributed.all_reduce(received, op=torch.distributed.ReduceOp.MAX)
        return int(received) or None

    # -- saving -------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = self._stop_requested(trainer, pl_module)
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch end saves (and stops) in a moment
        if stop is not None or (self.every_n_steps and trainer.global_step % self.every_n_steps == 0):
            self._save(trainer, stop)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, self._stop_requested(trainer, pl_module, epoch_end=True))

    def _save(self, trainer: pl.Trainer, stop: int | None) -> None:
        folder = new_shard_folder(self.path, trainer.global_step) if self.class_shards else None
        self._shard_folder = folder
        try:
            trainer.save_checkpoint(self.path, weights_only=False)  # every process takes part; the first writes
        except CheckpointWriteError as error:
            raise CheckpointWriteError(f"{error} {self._previous()}") from error
        finally:
            self._shard_folder = None
        if trainer.is_global_zero:
            remove_stale_class_shards(self.path, keep=folder)
        self._saved = (stop, trainer.global_step)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self._shard_folder is not None:  # the module's hook, which runs next, writes the rows there
            checkpoint[SHARD_REQUEST] = self._shard_folder

    def _previous(self) -> str:
        """What the failed save left to resume from: the previous checkpoint, read back to be sure."""
        if not self.path.is_file():
            return "No checkpoint of this run had been saved; the run stops."
        try:
            step = load_checkpoint(self.path).get("global_step")
        except (CheckpointError, OSError) as error:
            return f"The previous {self.path.name} cannot be read either ({error})."
        return (f"The previous {self.path} (step {step}) is intact: fix the cause and resume from it with "
                "ckpt_path=auto.")

    # Lightning hands a step's (or an epoch's) metrics to the loggers after the hook that saved: the
    # loggers are flushed, and a stop is raised, at the next hook, so the logs reach the checkpoint's step.
    def _after_save(self, trainer: pl.Trainer) -> None:
        if self._saved is None:
            return
        (stop, step), self._saved = self._saved, None
        for logger in trainer.loggers:
            logger.save()
        if stop is not None:
            if stop in REQUEUE_SIGNALS and trainer.is_global_zero:  # SLURM's time-limit warning
                rank_zero_info(requeue())
            raise RunInterrupted(stop, step, self.path)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._after_save(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._after_save(trainer)
