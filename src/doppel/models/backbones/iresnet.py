"""The ArcFace "E-IR" ResNets for 112x112 faces (Deng et al., sec. 3.2 / Fig. 7 of the ArcFace paper).

Stem 3x3/64 conv -> BN -> PReLU at full resolution; stages of improved-residual (IR) blocks with the
stride-2 convolution at the start of each stage, so a 112x112 face leaves the trunk at 7x7x512; the
"E" output head (BN -> dropout -> FC -> BN) is :class:`doppel.models.heads.EmbeddingHead`.

Two block layouts, each matching a public reference parameter for parameter:
- ``block="ir"``: insightface's ``iresnet`` (arcface_torch): BN -> conv3x3 -> BN -> PReLU -> conv3x3
  (stride) -> BN; the first block of each stage projects its shortcut (1x1 conv + BN).
  ResNet-50 with a 512-d head: 43,590,848 parameters.
- ``block="ir_se"``: the IR-SE blocks of InsightFace_Pytorch (TreB1eN), used for the SEC paper's
  SE-ResNet50E-IR: BN -> conv3x3 -> PReLU -> conv3x3 (stride) -> BN -> squeeze-excitation (reduction
  16); a shortcut of equal width is a strided 1x1 max-pool, a wider one a 1x1 conv + BN.
  ResNet-50 with a 512-d head: 43,797,696 parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

DEPTHS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3),
}


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)


class SqueezeExcitation(nn.Module):
    """Channel gates from the average-pooled map: 1x1 conv (C -> C/r) -> ReLU -> 1x1 conv -> sigmoid."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class IRBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int, block: str, se_reduction: int) -> None:
        super().__init__()
        if block == "ir":
            self.body = nn.Sequential(nn.BatchNorm2d(in_ch), _conv3x3(in_ch, out_ch), nn.BatchNorm2d(out_ch),
                                      nn.PReLU(out_ch), _conv3x3(out_ch, out_ch, stride), nn.BatchNorm2d(out_ch))
            project = stride != 1 or in_ch != out_ch
        else:
            self.body = nn.Sequential(nn.BatchNorm2d(in_ch), _conv3x3(in_ch, out_ch), nn.PReLU(out_ch),
                                      _conv3x3(out_ch, out_ch, stride), nn.BatchNorm2d(out_ch),
                                      SqueezeExcitation(out_ch, se_reduction))
            project = in_ch != out_ch
        if project:
            self.shortcut: nn.Module = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                                     nn.BatchNorm2d(out_ch))
        else:
            self.shortcut = nn.MaxPool2d(1, stride) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    def __init__(self, depth: int = 50, block: str = "ir", se_reduction: int = 16, in_channels: int = 3,
                 widths: Sequence[int] = (64, 128, 256, 512)) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"backbone.depth={depth} is not one of {sorted(DEPTHS)}.")
        if block not in ("ir", "ir_se"):
            raise ValueError(f"backbone.block={block!r} must be 'ir' (insightface) or 'ir_se' (IR-SE).")
        self.stem = nn.Sequential(_conv3x3(in_channels, 64), nn.BatchNorm2d(64), nn.PReLU(64))
        layers: list[nn.Module] = []
        channels = 64
        for width, count in zip(widths, DEPTHS[depth]):
            for i in range(count):
                layers.append(IRBlock(channels, width, 2 if i == 0 else 1, block, se_reduction))
                channels = width
        self.stages = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(images))
