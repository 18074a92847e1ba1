"""Preprocessing and the paper's augmentation (sec. 4.2.3), applied to whole batches on the device."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# ITU-R BT.601 luma weights for "losing the colour".
_LUMA = (0.299, 0.587, 0.114)


def luma(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] RGB -> [B, 1, H, W] luma."""
    return (images * images.new_tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)


# name -> (channel order, scale applied first, per-channel mean, per-channel std) on 0-255 RGB input.
PREPROCESS_STYLES: dict[str, tuple[str, float, tuple[float, ...], tuple[float, ...]]] = {
    # (x - 127.5) / 128: the Doppelganger and IE papers' face preprocessing.
    "centered": ("rgb", 1.0, (127.5,) * 3, (128.0,) * 3),
    # (x - 127.5) / 127.5, i.e. [-1, 1]: insightface's arcface_torch.
    "unit": ("rgb", 1.0, (127.5,) * 3, (127.5,) * 3),
    # x / 255 with ImageNet mean and std: torchvision and timm weights.
    "imagenet": ("rgb", 1 / 255, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # BGR in [0, 255] minus the Caffe mean [104, 117, 128]: the Caffe-converted BN-Inception weights.
    "caffe_bgr": ("bgr", 1.0, (104.0, 117.0, 128.0), (1.0, 1.0, 1.0)),
}


class Preprocess(nn.Module):
    """0-255 RGB batch -> the input a network was built (or trained) for: resized to ``size``
    (bilinear; antialiased when shrinking), reduced to luma when ``channels`` is 1, normalised by
    one of :data:`PREPROCESS_STYLES`."""

    def __init__(self, size: tuple[int, int], style: str = "centered", channels: int = 3) -> None:
        super().__init__()
        if style not in PREPROCESS_STYLES:
            raise ValueError(f"backbone.preprocess={style!r} is not one of {sorted(PREPROCESS_STYLES)}.")
        if channels not in (1, 3):
            raise ValueError(f"backbone.in_channels={channels} must be 1 (luma) or 3 (colour).")
        order, scale, mean, std = PREPROCESS_STYLES[style]
        if channels == 1:  # one channel: the luma of the mean and std
            mean, std = (sum(w * m for w, m in zip(_LUMA, mean)),), (sum(w * s for w, s in zip(_LUMA, std)),)
        self.size, self.style, self.channels = (int(size[0]), int(size[1])), style, channels
        self.bgr, self.scale = order == "bgr" and channels == 3, scale
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.float()
        if tuple(images.shape[-2:]) != self.size:
            shrinking = images.shape[-2] > self.size[0] or images.shape[-1] > self.size[1]
            images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False,
                                   antialias=shrinking)
        if self.channels == 1:
            images = luma(images)
        elif self.bgr:
            images = images.flip(1)
        return (images * self.scale - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"size={self.size}, style={self.style!r}, channels={self.channels}"


class PaperAugment(nn.Module):
    """Random horizontal mirror, a per-channel colour shift in [-shift, shift], and grayscale with
    probability ``grayscale_p``. Works on 0-255 float batches; draws from its own seeded generator."""

    def __init__(self, mirror: bool = True, color_shift: float = 10.0, grayscale_p: float = 0.1,
                 seed: int = 0) -> None:
        super().__init__()
        if not color_shift >= 0:
            raise ValueError(f"augment.color_shift={color_shift} must be >= 0 (0 turns it off).")
        if not 0 <= grayscale_p <= 1:
            raise ValueError(f"augment.grayscale_p={grayscale_p} must be a probability in [0, 1].")
        self.mirror, self.color_shift, self.grayscale_p = mirror, color_shift, grayscale_p
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        images = images.float()
        flip = torch.rand(b, generator=self.generator) < (0.5 if self.mirror else 0.0)
        shift = (torch.rand(b, 3, generator=self.generator) * 2 - 1) * self.color_shift
        gray = torch.rand(b, generator=self.generator) < self.grayscale_p
        flip, shift, gray = flip.to(images.device), shift.to(images.device), gray.to(images.device)
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        images = torch.where(gray[:, None, None, None], luma(images).expand_as(images), images)
        return (images + shift[:, :, None, None]).clamp(0, 255)
