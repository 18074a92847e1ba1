"""The embedding head shared by every backbone: trunk feature map -> raw embedding."""

from __future__ import annotations

import torch
from torch import nn

from doppel.models.layers import Maxout

POST_BN = ("none", "affine", "fixed_scale")


class EmbeddingHead(nn.Module):
    """[pre-BN] -> pool -> [dropout] -> [linear -> maxout] -> [post-BN].

    ``pool="avg"`` averages the feature map (BN-Inception, WRN, timm trunks); ``pool="flatten"`` keeps
    every position (Face-ResNet, the IR ResNets, the IE networks). ``pre_bn`` normalises the trunk's
    channels: BatchNorm2d on the map before flattening, BatchNorm1d on the pooled vector after
    averaging. ``embedding_dim=None`` leaves the pooled features as the embedding (no linear layer).
    ``post_bn="fixed_scale"`` is insightface's feature BN: shift learned, scale frozen at 1.
    """

    def __init__(self, channels: int, spatial: tuple[int, int], embedding_dim: int | None, pool: str = "flatten",
                 pre_bn: bool = False, dropout: float = 0.0, maxout_group: int = 1, post_bn: str = "none",
                 bias: bool = True) -> None:
        super().__init__()
        if pool not in ("avg", "flatten"):
            raise ValueError(f"backbone.pool={pool!r} must be 'avg' or 'flatten'.")
        if post_bn not in POST_BN:
            raise ValueError(f"backbone.post_bn={post_bn!r} must be one of {POST_BN}.")
        if maxout_group < 1:
            raise ValueError(f"backbone.maxout_group={maxout_group} must be at least 1.")
        if embedding_dim is not None and (not isinstance(embedding_dim, int) or embedding_dim < 1):
            raise ValueError(f"backbone.embedding_dim={embedding_dim} must be a positive integer "
                             "(or null: the pooled features are the embedding).")
        if not 0 <= dropout < 1:
            raise ValueError(f"backbone.dropout={dropout} must be in [0, 1).")
        self.pool = pool
        flat = pool == "flatten"
        self.pre_bn = (nn.BatchNorm2d(channels) if flat else nn.BatchNorm1d(channels)) if pre_bn else nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        in_features = channels * spatial[0] * spatial[1] if flat else channels
        if embedding_dim is None:
            if maxout_group > 1 or post_bn != "none":
                raise ValueError("backbone.embedding_dim=null (pooled features as the embedding) takes no "
                                 "maxout_group or post_bn; set an embedding_dim to use them.")
            self.fc: nn.Module = nn.Identity()
            self.embedding_dim = in_features
        else:
            self.fc = nn.Linear(in_features, embedding_dim * maxout_group, bias=bias)
            self.embedding_dim = embedding_dim
        self.maxout = Maxout(maxout_group) if maxout_group > 1 else nn.Identity()
        self.post_bn = nn.BatchNorm1d(self.embedding_dim) if post_bn != "none" else nn.Identity()
        if post_bn == "fixed_scale":
            nn.init.ones_(self.post_bn.weight)
            self.post_bn.weight.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool == "flatten":
            x = self.dropout(self.pre_bn(features)).flatten(1)
        else:
            pooled = features.mean((2, 3)) if features.dim() == 4 else features  # timm trunks pool themselves
            x = self.dropout(self.pre_bn(pooled))
        return self.post_bn(self.maxout(self.fc(x)))
