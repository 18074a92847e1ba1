"""Fault injection for resume tests: a callback that sends a real signal to its own process mid-step."""

import os
import signal

import pytorch_lightning as pl


class SignalAtStep(pl.Callback):
    """Sends ``signum`` (a name: SIGKILL, SIGTERM, SIGINT) to this process when optimizer step ``step``
    (1-based) has run its forward and backward pass, before the weights change: the middle of a step.
    ``rank``: the process that receives it (the others only learn of it through the run)."""

    def __init__(self, step: int, signum: str, rank: int = 0) -> None:
        self.step, self.signum, self.rank = step, getattr(signal, signum), rank

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step + 1 == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), self.signum)
