"""Preprocessing and the paper's augmentation (sec. 4.2.3), applied to whole batches on the device."""

from __future__ import annotations

import torch
from torch import nn

# ITU-R BT.601 luma weights for "losing the colour".
_LUMA = (0.299, 0.587, 0.114)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0-255 float) [B, 3, H, W] -> (x - 127.5) / 128."""
    return (images.float() - 127.5) / 128.0


class PaperAugment(nn.Module):
    """Random horizontal mirror, a per-channel colour shift in [-shift, shift], and grayscale with
    probability ``grayscale_p``. Works on 0-255 float batches; draws from its own seeded generator."""

    def __init__(self, mirror: bool = True, color_shift: float = 10.0, grayscale_p: float = 0.1,
                 seed: int = 0) -> None:
        super().__init__()
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
        luma = (images * images.new_tensor(_LUMA)[None, :, None, None]).sum(1, keepdim=True)
        images = torch.where(gray[:, None, None, None], luma.expand_as(images), images)
        return (images + shift[:, :, None, None]).clamp(0, 255)
