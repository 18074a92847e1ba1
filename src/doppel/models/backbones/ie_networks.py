"""The IE paper's "normal" networks: the CNNs of its Table 1 and the 27-layer face ResNet of its Table 5.

Table 1 (MNIST, CIFAR-10, CIFAR-100): Conv0.x, then three groups Convk.x of 3x3 (5x5 for the MNIST
network of Fig. 2) stride-1 "same" convolutions, each group followed by 2x2/2 max-pooling, then one
fully connected layer; batch norm and PReLU after every convolution (the paper's sec. 4.1). The fully
connected layer's output is the embedding that softmax and the IE loss supervise.

Table 5 (faces, 112x96 input): Conv0 3x3/32 and Conv1 3x3/64 unpadded, max-pool; then Resblock1 (64),
Conv2 (128), pool, Resblock2-3 (128), Conv3 (256), pool, Resblock4-8 (256), Conv4 (512), pool,
Resblock9-11 (512), Fc5 -> 512: 27 convolutions. The unpadded "ConvN" layers shrink the map by 2
as the table lists (110x94, 108x92, 52x44, 24x20, 10x8); resblocks are padded. Activations are ReLU
(the paper's default outside Table 1). ``width=2`` is the paper's "powerful" variant: the layers
from Conv1 to the last resblock before Conv4 twice as wide.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _conv_unit(in_ch: int, out_ch: int, kernel: int, padding: int, batch_norm: bool,
               activation: str) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, 1, padding, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.PReLU(out_ch) if activation == "prelu" else nn.ReLU(inplace=True))
    return layers


class IECNN(nn.Module):
    """Table 1: ``conv0`` (width or None), ``groups`` of (layers, width), kernel, pad, pool 2x2/2."""

    def __init__(self, conv0: int | None = 64, groups: Sequence[Sequence[int]] = ((3, 64), (3, 64), (3, 64)),
                 kernel: int = 3, in_channels: int = 3, batch_norm: bool = True, activation: str = "prelu") -> None:
        super().__init__()
        if activation not in ("prelu", "relu"):
            raise ValueError(f"backbone.activation={activation!r} must be 'prelu' or 'relu'.")
        layers: list[nn.Module] = []
        channels = in_channels
        if conv0:
            layers += _conv_unit(channels, conv0, 3, 1, batch_norm, activation)
            channels = conv0
        for count, width in groups:
            for _ in range(count):
                layers += _conv_unit(channels, width, kernel, kernel // 2, batch_norm, activation)
                channels = width
            layers.append(nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


class ResidualUnit(nn.Module):
    """Table 5's "classical residual unit": x + conv(act(conv(x))) with an activation after each conv."""

    def __init__(self, channels: int, batch_norm: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_unit(channels, channels, 3, 1, batch_norm, "relu"),
                                  *_conv_unit(channels, channels, 3, 1, batch_norm, "relu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class IEFaceResNet(nn.Module):
    def __init__(self, width: int = 1, in_channels: int = 3, batch_norm: bool = False,
                 resblocks: Sequence[int] = (1, 2, 5, 3)) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"backbone.width={width} must be a positive widening factor.")
        stages = [64 * width, 128 * width, 256 * width, 512]
        layers: list[nn.Module] = [*_conv_unit(in_channels, 32, 3, 0, batch_norm, "relu")]  # Conv0
        channels = 32
        for out_ch, count in zip(stages, resblocks):
            layers += _conv_unit(channels, out_ch, 3, 0, batch_norm, "relu")  # Conv1..Conv4, unpadded
            layers.append(nn.MaxPool2d(2, 2))
            layers += [ResidualUnit(out_ch, batch_norm) for _ in range(count)]
            channels = out_ch
        self.features = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)
