"""Embedding-norm regularisers of the SEC paper, addable to any loss combination (``regularizer=``)."""

from __future__ import annotations

import torch
from torch import nn


class SphericalEmbeddingConstraint(nn.Module):
    """SEC, eq. (17) of the SEC paper: ``mean_i (||f_i|| - mu)^2`` on the raw (un-normalised) embedding.

    The weight eta is the term's ``weight`` in the loss set. ``mu``:
    ``batch`` - the batch's mean norm, detached (the paper's parameter-free choice);
    ``running`` - an exponential moving average of that mean with ``momentum`` (steadier on small batches);
    ``zero`` - mu = 0, the L2-reg baseline (mean squared norm).
    ``ramp_steps > 0`` multiplies the penalty by ``min(1, step / ramp_steps)``: eta rises linearly from 0.
    """

    MUS = ("batch", "running", "zero")

    def __init__(self, mu: str = "batch", momentum: float = 0.01, ramp_steps: int = 0) -> None:
        super().__init__()
        if mu not in self.MUS:
            raise ValueError(f"SEC mu must be one of {self.MUS}, got {mu!r}.")
        if not 0 < momentum <= 1:
            raise ValueError(f"SEC momentum must be in (0, 1], got {momentum}.")
        self.mu, self.momentum, self.ramp_steps = mu, momentum, ramp_steps
        self.register_buffer("running_mu", torch.tensor(0.0))
        self.register_buffer("running_mu_set", torch.tensor(False))  # a flag, not a NaN: checkpoints stay finite
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.last_mu = torch.tensor(0.0)
        self.last_ramp = 1.0

    @property
    def ramp(self) -> float:
        return min(1.0, int(self.step) / self.ramp_steps) if self.ramp_steps > 0 else 1.0

    def centre(self, norms: torch.Tensor) -> torch.Tensor:
        """mu for mu="batch" or "running" (mu="zero" needs no norms: see forward)."""
        batch_mu = norms.detach().mean()
        if self.mu == "batch" or not self.training:
            return batch_mu if self.mu == "batch" else self.running_mu.to(norms)
        with torch.no_grad():
            self.running_mu.copy_(torch.where(self.running_mu_set, (1 - self.momentum) * self.running_mu
                                              + self.momentum * batch_mu, batch_mu))
            self.running_mu_set.fill_(True)
        return self.running_mu.clone()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.last_ramp = self.ramp
        if self.mu == "zero":  # no root needed: ||f||^2 directly
            penalty = embeddings.pow(2).sum(1).mean() * self.last_ramp
        else:
            norms = embeddings.norm(dim=1)
            mu = self.centre(norms)
            self.last_mu = mu.detach()
            penalty = (norms - mu).pow(2).mean() * self.last_ramp
        if self.training:
            self.step += 1
        return penalty

    def scalars(self) -> dict[str, torch.Tensor]:
        logs = {"mu": self.last_mu} if self.mu != "zero" else {}
        if self.ramp_steps > 0:
            logs["ramp"] = torch.tensor(self.last_ramp)
        return logs


class L2Reg(SphericalEmbeddingConstraint):
    """L2-reg, the SEC paper's baseline (from Sohn's N-pair paper): ``mean_i ||f_i||^2``, SEC with mu = 0."""

    def __init__(self, ramp_steps: int = 0) -> None:
        super().__init__(mu="zero", ramp_steps=ramp_steps)
