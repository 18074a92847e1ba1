"""Layers shared by the backbones: ARFA activation, maxout, and the LSUV-style setting of ARFA's k."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ARFA(nn.Module):
    """Adaptive Rational Fraction Activation, eq. (1) of the Doppelganger paper (sec. 4.2.2).

    F(x) = k x for x > 0 and k x / (a - x) for x <= 0. ``a`` is channel-wise and trainable, kept
    positive as softplus of a free parameter (initial a = 1: the slope is k on both sides of 0).
    ``k`` is layer-wise, not trained, and set by :func:`lsuv_init_` so the output variance is about 1.
    """

    def __init__(self, channels: int, a_init: float = 1.0) -> None:
        super().__init__()
        if a_init <= 0:
            raise ValueError(f"ARFA a_init={a_init} must be positive.")
        raw = torch.log(torch.expm1(torch.tensor(float(a_init))))  # softplus^-1
        self.raw_a = nn.Parameter(raw.repeat(channels))
        self.register_buffer("k", torch.tensor(1.0))

    @property
    def a(self) -> torch.Tensor:
        return F.softplus(self.raw_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        a = self.a.view(shape).to(x.dtype)
        negative = x.clamp(max=0)  # a - negative >= a > 0: no division by zero in either branch
        return self.k * (F.relu(x) + negative / (a - negative))


class Maxout(nn.Module):
    """Maxout over groups of ``group`` consecutive features (Goodfellow et al.)."""

    def __init__(self, group: int = 2) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] % self.group:
            raise ValueError(f"maxout group {self.group} does not divide {x.shape[1]} features.")
        return x.view(x.shape[0], x.shape[1] // self.group, self.group, *x.shape[2:]).amax(2)


class _StopForward(Exception):
    """Raised by a hook to end a forward pass at the layer being measured."""


@torch.no_grad()
def lsuv_init_(model: nn.Module, batch: torch.Tensor) -> list[float]:
    """Set every ARFA's k, in forward order, so its output variance on ``batch`` is 1.

    LSUV (Mishkin & Matas) adapted as the paper does for ARFA: F is linear in k and the layers before
    are already fitted, so one measurement and one rescale per layer suffice; the measuring pass stops
    at the layer it measures. Returns the variances of one final full pass, one per ARFA layer.
    """
    layers = [m for m in model.modules() if isinstance(m, ARFA)]
    if not layers:  # nothing to fit (every backbone but the Face-ResNets)
        return []
    was_training = model.training
    model.train()  # batch norm, if any, normalises with batch statistics as in training
    for layer in layers:
        captured: dict[str, torch.Tensor] = {}

        def stop_here(_m, _i, out, store=captured):
            store["out"] = out
            raise _StopForward

        handle = layer.register_forward_hook(stop_here)
        try:
            model(batch)
        except _StopForward:
            pass
        handle.remove()
        variance = captured["out"].float().var().item()
        if variance > 0:
            layer.k.div_(variance ** 0.5)
    outputs: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(lambda _m, _i, out: outputs.append(out.float().var())) for layer in layers]
    model(batch)
    for handle in handles:
        handle.remove()
    for module in model.modules():  # the measuring passes must not leave their statistics behind
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
    model.train(was_training)
    return [v.item() for v in outputs]
