"""Wide ResNet (Zagoruyko & Komodakis), the IE paper's "powerful" network for CIFAR (WRN-28-10).

3x3/16 conv, then three groups of (depth - 4) / 6 pre-activation basic blocks (BN -> ReLU -> conv3x3
-> BN -> ReLU -> [dropout] -> conv3x3) of widths 16k, 32k, 64k (160 / 320 / 640 for k = 10), strides
1, 2, 2, a 1x1 convolution on the shortcut where the width changes, and a final BN -> ReLU. The
embedding is the average-pooled 640-d map; the classifier is the loss's (``loss=softmax``: with 10
classes the whole network has 36,479,194 parameters, as the reference implementation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PreActBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = (nn.Conv2d(in_ch, out_ch, 1, stride, bias=False)
                         if in_ch != out_ch or stride != 1 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = F.relu(self.bn2(out))
        out = F.dropout(out, self.dropout, self.training)
        out = self.conv2(out)
        # The projection sees the pre-activated input, as in the reference implementation.
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    def __init__(self, depth: int = 28, widen_factor: int = 10, dropout: float = 0.0, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"backbone.depth={depth} must be 6n + 4 (e.g. 16, 22, 28, 40).")
        if not 0 <= dropout < 1:
            raise ValueError(f"backbone.dropout={dropout} must be in [0, 1).")
        per_group = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks: list[nn.Module] = []
        channels = 16
        for group, width in enumerate(widths):
            for i in range(per_group):
                blocks.append(PreActBlock(channels, width, 2 if group > 0 and i == 0 else 1, dropout))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(channels)
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.blocks(self.stem(images))))


def init_wide_resnet(net: nn.Module) -> None:
    """He init (fan-out) of the convolutions, as the reference implementation."""
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
