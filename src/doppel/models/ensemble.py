"""Several trained networks as one: their embeddings side by side (the Doppelganger paper's ensembles,
Table 6, score a pair by the average of the networks' cosine similarities)."""

from __future__ import annotations

import torch
from torch import nn


class EnsembleNet(nn.Module):
    """``forward`` = the members' raw embeddings concatenated; ``blocks`` = how many, so the evaluation can
    normalise each member's block on its own (then a dot product is the mean of the members' cosines)."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError("an ensemble needs at least two networks (ckpt_path=[a.ckpt,b.ckpt,...]).")
        dims = {int(m.embedding_dim) for m in members}
        if len(dims) != 1:
            raise ValueError(f"the ensemble's networks embed in different sizes {sorted(dims)}: the average of "
                             "cosine similarities needs equal blocks.")
        self.members = nn.ModuleList(members)
        self.blocks = len(members)
        self.embedding_dim = dims.pop() * self.blocks

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([member(images) for member in self.members], dim=1)

    def to_channels_last(self) -> EnsembleNet:
        for member in self.members:
            member.to_channels_last()
        return self
