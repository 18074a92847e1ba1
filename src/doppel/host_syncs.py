"""Counting host syncs on the CPU: the calls that, on a GPU, make the host wait for the device.

On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` reports every synchronising call. The CPU has no
such thing, so :class:`HostSyncCounter` counts, through ``__torch_function__``, the calls that would be
one there: reading a value on the host (``item``, ``tolist``, ``bool()``, ``int()``, ``float()``,
``cpu``, ``numpy``), results whose shape depends on the values (``nonzero``, ``unique``,
``masked_select``, indexing with a boolean mask) and moving a tensor to a device (``to(device)``,
``cuda``: from pageable host memory the copy waits for the stream). A run on the CPU that counts 0 in a
step makes none of these calls, so it cannot sync on a GPU either, except inside an operator.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import TYPE_CHECKING

import torch
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    import pytorch_lightning as pl

_HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__,
               torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy}
_VALUE_SHAPED = {torch.Tensor.nonzero, torch.nonzero, torch.Tensor.unique, torch.unique,
                 torch.unique_consecutive, torch.Tensor.unique_consecutive, torch.masked_select,
                 torch.Tensor.masked_select, torch.argwhere, torch.Tensor.argwhere}
_FROM_HOST = {torch.tensor, torch.as_tensor, torch.scalar_tensor}
_TRANSFERS = {torch.Tensor.to, torch.Tensor.cuda}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
_OURS = f"{os.sep}doppel{os.sep}"


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (made on the host: a CPU generator's draws) on ``device`` without making the host wait:
    through pinned memory, asynchronously (the caching host allocator keeps the buffer until the copy
    is done)."""
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def at_sync_point(trainer: pl.Trainer) -> bool:
    """Whether the step just taken is one where the run may wait for the device: every
    ``trainer.log_every_n_steps`` steps, where Lightning reads the logged values back anyway. The loss
    checks (:meth:`~doppel.losses.loss_set.LossSet.check`) and the processes' agreement on a stop signal
    run there; the steps between make no host sync."""
    return trainer.global_step % max(1, trainer.log_every_n_steps) == 0


def _boolean_index(index: object) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


def _to_a_device(args: tuple, kwargs: dict) -> bool:
    """``Tensor.to`` with a device (or a tensor to take it from) and without ``non_blocking=True``."""
    if kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True and isinstance(args[1], (torch.device, str))):
        return False
    return "device" in kwargs or any(isinstance(a, (torch.device, str, torch.Tensor)) for a in args[1:2])


def _caller() -> tuple[str | None, bool]:
    """(the innermost frame of doppel's own code, whether it made the call itself), skipping torch's."""
    direct = True
    frame = sys._getframe(2)  # past _caller and __torch_function__
    while frame is not None:
        name = frame.f_code.co_filename
        if _OURS in name and not name.endswith("host_syncs.py"):
            return f"{name[name.rindex(_OURS) + 1:]}:{frame.f_lineno} {frame.f_code.co_name}", direct
        if f"{os.sep}torch{os.sep}" not in name:
            direct = False
        frame = frame.f_back
    return None, False


def _might_sync(func, args: tuple, kwargs: dict) -> bool:
    if func in _HOST_READS or func in _VALUE_SHAPED:
        return True
    if func in _FROM_HOST:
        return kwargs.get("device") is not None
    if func is torch.Tensor.to:
        return _to_a_device(args, kwargs)
    if func is torch.Tensor.cuda:
        return not kwargs.get("non_blocking")
    if func in _INDEXING:
        return _boolean_index(args[1])
    return False


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as syncs: ...`` then ``syncs.total`` and ``syncs.sites`` (the line of
    doppel's code that made them -> count). Calls made outside doppel's code (Lightning's loop between
    hooks) are not counted; calls Lightning makes for doppel's (``self.log`` of a Python number) are.
    A device transfer counts where doppel's code asks for it directly."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _might_sync(func, args, kwargs):
            site, direct = _caller()
            if site is not None and (direct or func not in _TRANSFERS):
                self.sites[f"{getattr(func, '__name__', func)} at {site}"] += 1
        return func(*args, **kwargs)
