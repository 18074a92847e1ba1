"""Face-ResNet of the Doppelganger paper (Table 1), with ARFA activations; the trunk of ``face_resnet``.

Full size (the defaults): 259x259x3 -> 5x5/64 conv s2 -> 5x5/64 conv -> maxpool ->
resblock 128 (x1) -> 3x3 128+64+64 conv (d = 1, 2, 3) -> maxpool -> resblock 256 (x2) ->
3x3 256+256 conv (d = 1, 2) -> maxpool -> resblock 512 (x5) -> 3x3 1024 conv -> maxpool ->
resblock 1024 (x3) -> fc -> maxout (group 2) -> 512. Stem and transition convolutions are unpadded
("valid"), which gives Table 1's spatial sizes exactly (128, 124, 62, 60, 30, 28, 14, 12, 6).

The same class, with narrower ``widths``, fewer blocks, ``stem_stride=1`` and ``padding="same"``,
gives the small variant that trains on CPU at the emoji image size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from doppel.models.layers import ARFA


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, dilation: int = 1, padding: int = 0,
          batch_norm: bool = False) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    return layers


class ResBlock(nn.Module):
    """x + ARFA(conv(ARFA(conv(x)))), 3x3 convs; a 1x1 projection when the width changes."""

    def __init__(self, in_ch: int, out_ch: int, batch_norm: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv(in_ch, out_ch, 3, padding=1, batch_norm=batch_norm), ARFA(out_ch),
            *_conv(out_ch, out_ch, 3, padding=1, batch_norm=batch_norm), ARFA(out_ch),
        )
        self.shortcut = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.body(x)


class DilatedConcat(nn.Module):
    """Parallel 3x3 convolutions with different dilations, concatenated (Table 1's "128+64+64, d=1,2,3").

    The first branch gets half the output channels (all of them if it is alone), the rest share the
    other half equally. ``padding="valid"`` trims 2 pixels as an undilated 3x3 conv would.
    """

    def __init__(self, in_ch: int, out_ch: int, dilations: Sequence[int], padding: str, batch_norm: bool) -> None:
        super().__init__()
        splits = [out_ch] if len(dilations) == 1 else _split(out_ch, len(dilations))
        self.branches = nn.ModuleList()
        for width, d in zip(splits, dilations):
            pad = d - 1 if padding == "valid" else d
            self.branches.append(nn.Sequential(*_conv(in_ch, width, 3, dilation=d, padding=pad,
                                                      batch_norm=batch_norm), ARFA(width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.branches], dim=1)


def _split(channels: int, n: int) -> list[int]:
    first = channels // 2
    rest = [(channels - first) // (n - 1)] * (n - 1)
    rest[-1] += channels - first - sum(rest)
    return [first, *rest]


class FaceResNet(nn.Module):
    """The convolutional trunk of Table 1: image -> feature map (``out_channels`` channels).

    The head (fc + maxout) is :class:`doppel.models.heads.EmbeddingHead`, attached by
    :func:`doppel.models.get_backbone`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        stem_channels: int = 64,
        stem_stride: int = 2,
        widths: Sequence[int] = (128, 256, 512, 1024),
        depths: Sequence[int] = (1, 2, 5, 3),
        transition_dilations: Sequence[Sequence[int]] = ((1, 2, 3), (1, 2), (1,)),
        padding: str = "valid",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if padding not in ("valid", "same"):
            raise ValueError(f"backbone.padding={padding!r} must be 'valid' or 'same'.")
        if not len(widths) == len(depths) == len(transition_dilations) + 1:
            raise ValueError("backbone.widths and backbone.depths need one entry per stage and "
                             "backbone.transition_dilations one fewer.")
        stem_pad = 0 if padding == "valid" else 2
        layers: list[nn.Module] = [
            *_conv(in_channels, stem_channels, 5, stride=stem_stride, padding=stem_pad, batch_norm=batch_norm),
            ARFA(stem_channels),
            *_conv(stem_channels, stem_channels, 5, padding=stem_pad, batch_norm=batch_norm),
            ARFA(stem_channels),
            nn.MaxPool2d(2),
        ]
        channels = stem_channels
        for stage, (width, depth) in enumerate(zip(widths, depths)):
            for _ in range(depth):
                layers.append(ResBlock(channels, width, batch_norm))
                channels = width
            if stage < len(transition_dilations):
                layers.append(DilatedConcat(channels, widths[stage + 1], transition_dilations[stage],
                                            padding, batch_norm))
                layers.append(nn.MaxPool2d(2))
                channels = widths[stage + 1]
        self.features = nn.Sequential(*layers)
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features(images)


def init_face_resnet(net: nn.Module) -> None:
    """Unit-gain init of every conv and linear layer, trunk and head; ARFA's k is then fitted by LSUV
    (:func:`doppel.models.layers.lsuv_init_`)."""
    for module in net.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="linear")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
