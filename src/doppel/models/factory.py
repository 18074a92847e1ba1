"""``get_backbone(name, **options)``: every network of the three papers, and any timm model, behind one
interface: 0-255 RGB images in, raw (un-normalised) embedding out.

A backbone is three parts: :class:`~doppel.data.transforms.Preprocess` (resize to the network's input
size and normalise as its weights expect), a trunk (image -> feature map or pooled vector, one file
per family in ``backbones/``), and the shared :class:`~doppel.models.heads.EmbeddingHead`. Each
family's defaults are the paper's; every option can be overridden from config
(``backbone.embedding_dim=256``, ``backbone.input_size=[64,64]``).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from doppel.data.transforms import Preprocess
from doppel.models.backbones.bn_inception import BNInception
from doppel.models.backbones.face_resnet import FaceResNet, init_face_resnet
from doppel.models.backbones.ie_networks import IECNN, IEFaceResNet
from doppel.models.backbones.iresnet import IResNet
from doppel.models.backbones.timm_models import TimmTrunk
from doppel.models.backbones.wide_resnet import WideResNet, init_wide_resnet
from doppel.models.heads import EmbeddingHead

HEAD_OPTIONS = ("embedding_dim", "pool", "pre_bn", "dropout", "maxout_group", "post_bn", "head_bias")


@dataclass(frozen=True)
class BackboneSpec:
    trunk: Callable[..., nn.Module]
    input_size: tuple[int, int] | None  # None: the data's image size
    preprocess: str = "centered"
    head: dict[str, Any] = field(default_factory=dict)
    trunk_options: dict[str, Any] = field(default_factory=dict)
    init: Callable[[nn.Module], None] | None = None
    in_channels: int = 3


_IR_HEAD = {"embedding_dim": 512, "pool": "flatten", "pre_bn": True, "dropout": 0.0}

BACKBONES: dict[str, BackboneSpec] = {
    # Doppelganger paper, Table 1.
    "face_resnet": BackboneSpec(FaceResNet, (259, 259), head={"embedding_dim": 512, "maxout_group": 2},
                                init=init_face_resnet),
    # SEC paper: BN-Inception + global average pool -> BN -> linear 1024 -> 512.
    "bn_inception": BackboneSpec(BNInception, (224, 224), "caffe_bgr",
                                 head={"embedding_dim": 512, "pool": "avg", "pre_bn": True}),
    # ArcFace E-IR ResNet-50: insightface iresnet50 (feature BN with its scale frozen at 1).
    "resnet50_ir": BackboneSpec(IResNet, (112, 112), "unit", head={**_IR_HEAD, "post_bn": "fixed_scale"},
                                trunk_options={"depth": 50, "block": "ir"}),
    # SE-ResNet50E-IR of the SEC paper: the IR-SE-50 of InsightFace_Pytorch.
    "se_resnet50_ir": BackboneSpec(IResNet, (112, 112), "unit", head={**_IR_HEAD, "post_bn": "affine"},
                                   trunk_options={"depth": 50, "block": "ir_se"}),
    # IE paper, CIFAR "powerful" network.
    "wrn28_10": BackboneSpec(WideResNet, (32, 32), head={"embedding_dim": None, "pool": "avg"},
                             trunk_options={"depth": 28, "widen_factor": 10}, init=init_wide_resnet),
    # IE paper, Table 1 (and the 2-d feature network of its Fig. 2).
    "ie_cnn_mnist": BackboneSpec(IECNN, (28, 28), head={"embedding_dim": 256}, in_channels=1,
                                 trunk_options={"conv0": 64, "groups": [[3, 64], [3, 64], [3, 64]]}),
    "ie_cnn_mnist_2d": BackboneSpec(IECNN, (28, 28), head={"embedding_dim": 2}, in_channels=1,
                                    trunk_options={"conv0": None, "groups": [[2, 32], [2, 64], [2, 128]],
                                                   "kernel": 5}),
    "ie_cnn_cifar10": BackboneSpec(IECNN, (32, 32), head={"embedding_dim": 256},
                                   trunk_options={"conv0": 64, "groups": [[4, 64], [4, 96], [4, 128]]}),
    "ie_cnn_cifar100": BackboneSpec(IECNN, (32, 32), head={"embedding_dim": 512},
                                    trunk_options={"conv0": 96, "groups": [[4, 96], [4, 192], [4, 384]]}),
    # IE paper, Table 5 (Fc5 has no bias in the table's parameter count).
    "ie_face_resnet": BackboneSpec(IEFaceResNet, (112, 96), head={"embedding_dim": 512, "head_bias": False}),
    # Any timm model; its pooled features -> linear -> 512.
    "timm": BackboneSpec(TimmTrunk, (224, 224), "imagenet", head={"embedding_dim": 512, "pool": "avg"},
                         trunk_options={"model": "resnet50"}),
}


def check_backbone(name: str, input_size: int | str | tuple[int, int] | None = None, preprocess: str | None = None,
                   in_channels: int | None = None, checkpoint: str | None = None, **options: Any) -> None:
    """The checks of :func:`get_backbone` that need neither the data nor the trunk (run on the config
    before anything is loaded): the name, every option's key, the head's and preprocessing's values,
    the input size and local weight files."""
    spec = _spec(name)
    size = _input_size(spec, input_size, image_size=None)
    channels = in_channels if in_channels is not None else spec.in_channels
    trunk_options, head_options = split_options(name, options)
    Preprocess(size or (1, 1), preprocess or spec.preprocess, channels)
    EmbeddingHead(1, (1, 1), **_head_arguments(spec, head_options))
    for key, path in (("checkpoint", checkpoint), ("pretrained_path", trunk_options.get("pretrained_path"))):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"backbone.{key}={str(path)!r} does not exist; give a local weights file "
                                    "(nothing is downloaded).")


def _spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise ValueError(f"backbone.name={name!r} is not one of {sorted(BACKBONES)}.")
    return BACKBONES[name]


def _input_size(spec: BackboneSpec, input_size, image_size: int | None) -> tuple[int, int] | None:
    """The network's [H, W]; None while ``input_size=data`` and the data's size is not known yet."""
    size = spec.input_size if input_size is None else input_size
    if size in (None, "data"):
        size = image_size
    if size is None:
        return None
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
        raise ValueError(f"backbone.input_size={input_size} must be a positive int, [height, width] or 'data'.")
    return size


def _head_arguments(spec: BackboneSpec, head_options: dict[str, Any]) -> dict[str, Any]:
    arguments = {**spec.head, **head_options}
    if "head_bias" in arguments:
        arguments["bias"] = arguments.pop("head_bias")
    return arguments


def split_options(name: str, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trunk options, head options) of backbone ``name``: an option the trunk names is the trunk's (WRN's
    ``dropout`` is its block dropout), else a head option goes to the head (the IR ResNets' ``dropout``
    is insightface's, before the embedding FC), else to a trunk that takes any keyword (timm models)."""
    spec = BACKBONES[name]
    parameters = inspect.signature(spec.trunk).parameters
    named = {k for k, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"in_channels"}
    open_ended = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    trunk, head = {}, {}
    for key, value in options.items():
        if key in named:
            trunk[key] = value
        elif key in HEAD_OPTIONS:
            head[key] = value
        elif open_ended:
            trunk[key] = value
        else:
            known = sorted(named | set(HEAD_OPTIONS) | {"input_size", "preprocess", "in_channels", "checkpoint"})
            hint = difflib.get_close_matches(key, known, n=1)
            raise ValueError(f"backbone.{key} is not an option of backbone {name!r}"
                             f"{f' (did you mean {hint[0]}?)' if hint else ''}; its options: {', '.join(known)}.")
    return trunk, head


class EmbeddingNet(nn.Module):
    """preprocess -> trunk -> head. ``embedding_dim`` and ``input_size`` describe the network."""

    def __init__(self, preprocess: Preprocess, trunk: nn.Module, head: EmbeddingHead) -> None:
        super().__init__()
        self.preprocess = preprocess
        self.trunk = trunk
        self.head = head
        self.embedding_dim = head.embedding_dim
        self.input_size = preprocess.size
        self.channels_last = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.head(self.trunk(x))

    def to_channels_last(self) -> EmbeddingNet:
        """NHWC weights and inputs: faster convolutions with cuDNN and oneDNN under autocast."""
        self.channels_last = True
        return self.to(memory_format=torch.channels_last)


def get_backbone(name: str, image_size: int | None = None, input_size: int | str | tuple[int, int] | None = None,
                 preprocess: str | None = None, in_channels: int | None = None, checkpoint: str | None = None,
                 **options: Any) -> EmbeddingNet:
    """Build backbone ``name`` (a key of :data:`BACKBONES`).

    ``input_size`` (an int or [H, W]) overrides the family's; ``"data"`` means ``image_size``, the
    data's (square) image size (no resizing). ``checkpoint`` loads trunk weights
    from a local file in the layout of the family's public reference (BN-Inception: the Caffe port).
    Any other option goes to the trunk or the head (:func:`split_options`).
    """
    spec = _spec(name)
    size = _input_size(spec, input_size, image_size)
    if size is None:
        raise ValueError(f"backbone {name!r} with input_size=data needs the data's image size.")
    channels = in_channels if in_channels is not None else spec.in_channels
    trunk_options, head_options = split_options(name, options)
    trunk = spec.trunk(in_channels=channels, **{**spec.trunk_options, **trunk_options})
    preprocess_module = Preprocess(size, preprocess or spec.preprocess, channels)

    was_training = trunk.training
    trunk.eval()  # one image through batch norm
    try:
        with torch.no_grad():
            features = trunk(torch.zeros(1, channels, *size))
    except RuntimeError as error:  # a kernel larger than the shrunken map
        raise ValueError(f"backbone.input_size={list(size)} is too small for {name}: {error}") from None
    trunk.train(was_training)
    if features.numel() == 0:
        raise ValueError(f"backbone.input_size={list(size)} is too small for {name}'s pooling.")
    spatial = tuple(features.shape[-2:]) if features.dim() == 4 else (1, 1)
    head = EmbeddingHead(trunk.out_channels, spatial, **_head_arguments(spec, head_options))
    net = EmbeddingNet(preprocess_module, trunk, head)
    if spec.init is not None:
        spec.init(net)
    if checkpoint is not None:
        if not hasattr(trunk, "load_port_checkpoint"):
            raise ValueError(f"backbone.checkpoint is for bn_inception's port weights; {name} has none "
                             "(timm models take backbone.pretrained_path).")
        trunk.load_port_checkpoint(checkpoint)
    return net
