"""BN-Inception (Inception-v2 with batch norm, Ioffe & Szegedy), the metric-learning trunk of the SEC paper.

The layer widths are those of the widely used Caffe-converted PyTorch port (Cadene's
``pretrainedmodels.bninception``): convolutions with bias, each followed by batch norm and ReLU;
10,270,240 trunk parameters; 224x224 input; 1024 channels at 7x7 out. Its weights expect BGR input in
[0, 255] minus the mean [104, 117, 128] (``backbone.preprocess=caffe_bgr``).
:func:`load_port_checkpoint` maps the port's flat key names (``inception_3a_double_3x3_1_bn.weight``)
onto this module's nested ones.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from doppel.serialization import load_checkpoint


class ConvBNReLU(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding)  # bias, as in the Caffe model
        self.bn = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class InceptionBlock(nn.Module):
    """Up to four parallel branches, concatenated: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3; pool [-> 1x1].

    ``stride=2`` blocks (3c, 4e) have no 1x1 branch and a bare max-pool branch. ``pool`` is the pooling
    of the pool branch: "avg" or "max".
    """

    def __init__(self, in_ch: int, single: int, reduce3: int, out3: int, reduce_double: int, out_double: int,
                 pool: str, pool_proj: int, stride: int = 1) -> None:
        super().__init__()
        self.branch_1x1 = ConvBNReLU(in_ch, single, 1) if single else None
        self.branch_3x3 = nn.Sequential(ConvBNReLU(in_ch, reduce3, 1), ConvBNReLU(reduce3, out3, 3, stride, 1))
        self.branch_double = nn.Sequential(ConvBNReLU(in_ch, reduce_double, 1),
                                           ConvBNReLU(reduce_double, out_double, 3, 1, 1),
                                           ConvBNReLU(out_double, out_double, 3, stride, 1))
        pool_layer = (nn.AvgPool2d(3, stride, 1, ceil_mode=True, count_include_pad=True) if pool == "avg"
                      else nn.MaxPool2d(3, stride, 1 if stride == 1 else 0, ceil_mode=True))
        self.branch_pool = nn.Sequential(pool_layer, *([ConvBNReLU(in_ch, pool_proj, 1)] if pool_proj else []))
        self.out_channels = single + out3 + out_double + (pool_proj or in_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch_3x3(x), self.branch_double(x), self.branch_pool(x)]
        if self.branch_1x1 is not None:
            branches.insert(0, self.branch_1x1(x))
        return torch.cat(branches, 1)


# name: (1x1, 3x3 reduce, 3x3, double reduce, double 3x3, pool, pool proj, stride)
_BLOCKS: dict[str, tuple[int, int, int, int, int, str, int, int]] = {
    "3a": (64, 64, 64, 64, 96, "avg", 32, 1),
    "3b": (64, 64, 96, 64, 96, "avg", 64, 1),
    "3c": (0, 128, 160, 64, 96, "max", 0, 2),
    "4a": (224, 64, 96, 96, 128, "avg", 128, 1),
    "4b": (192, 96, 128, 96, 128, "avg", 128, 1),
    "4c": (160, 128, 160, 128, 160, "avg", 128, 1),
    "4d": (96, 128, 192, 160, 192, "avg", 128, 1),
    "4e": (0, 128, 192, 192, 256, "max", 0, 2),
    "5a": (352, 192, 320, 160, 224, "avg", 128, 1),
    "5b": (352, 192, 320, 192, 224, "max", 128, 1),
}


class BNInception(nn.Module):
    def __init__(self, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            ConvBNReLU(in_channels, 64, 7, 2, 3),
            nn.MaxPool2d(3, 2, ceil_mode=True),
            ConvBNReLU(64, 64, 1),
            ConvBNReLU(64, 192, 3, 1, 1),
            nn.MaxPool2d(3, 2, ceil_mode=True),
        )
        channels = 192
        self.blocks = nn.ModuleDict()
        for name, (single, r3, o3, rd, od, pool, proj, stride) in _BLOCKS.items():
            self.blocks[name] = InceptionBlock(channels, single, r3, o3, rd, od, pool, proj, stride)
            channels = self.blocks[name].out_channels
        self.out_channels = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for block in self.blocks.values():
            x = block(x)
        return x

    def port_names(self) -> dict[str, str]:
        """Our ConvBNReLU prefix -> the port's conv name (its BN is the same name + ``_bn``)."""
        names = {"stem.0": "conv1_7x7_s2", "stem.2": "conv2_3x3_reduce", "stem.3": "conv2_3x3"}
        for block_name, block in self.blocks.items():
            port = f"inception_{block_name}"
            if block.branch_1x1 is not None:
                names[f"blocks.{block_name}.branch_1x1"] = f"{port}_1x1"
            names[f"blocks.{block_name}.branch_3x3.0"] = f"{port}_3x3_reduce"
            names[f"blocks.{block_name}.branch_3x3.1"] = f"{port}_3x3"
            names[f"blocks.{block_name}.branch_double.0"] = f"{port}_double_3x3_reduce"
            names[f"blocks.{block_name}.branch_double.1"] = f"{port}_double_3x3_1"
            names[f"blocks.{block_name}.branch_double.2"] = f"{port}_double_3x3_2"
            if len(block.branch_pool) > 1:
                names[f"blocks.{block_name}.branch_pool.1"] = f"{port}_pool_proj"
        return names

    def map_port_state_dict(self, port_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The port's state dict in our key layout; its classifier (``last_linear``) is dropped.

        Raises ``KeyError`` naming every trunk key the port's file lacks, or has that we do not know:
        a silent partial load would train from a half-random network.
        """
        ours: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        used: set[str] = set()
        for prefix, port in self.port_names().items():
            pairs = [(f"{port}.weight", "conv.weight"), (f"{port}.bias", "conv.bias")]
            pairs += [(f"{port}_bn.{p}", f"bn.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
            # Files written before PyTorch 0.4.1 have no BN step counters; they are not weights.
            optional = (f"{port}_bn.num_batches_tracked", "bn.num_batches_tracked")
            for port_key, our_key in [*pairs, optional]:
                used.add(port_key)
                if port_key in port_state:
                    ours[f"{prefix}.{our_key}"] = port_state[port_key]
                elif port_key != optional[0]:
                    missing.append(port_key)
        unknown = sorted(k for k in port_state if k not in used and not k.startswith(("last_linear.", "fc.")))
        if unknown or missing:
            raise KeyError(f"not a checkpoint of the BN-Inception port: missing {missing[:5]} "
                           f"({len(missing)} in all), unknown {unknown[:5]} ({len(unknown)} in all).")
        return ours

    def load_port_checkpoint(self, path: str | Path) -> None:
        """Load the port's weights file (``bn_inception-*.pth``) from a local path."""
        state = load_checkpoint(path, key="backbone.checkpoint")
        state = state.get("state_dict", state)
        # Not strict: only the BN step counters can be absent, map_port_state_dict checked the rest.
        self.load_state_dict(self.map_port_state_dict(state), strict=False)
