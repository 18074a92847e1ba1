"""Preprocessing and the augmentations (the Doppelganger paper's, sec. 4.2.3; SimCLR's), applied to
whole batches on the device."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from doppel.host_syncs import to_device

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
    probability ``grayscale_p``, in that order (sec. 4.2.3: a grey image has lost its colour, shift
    included); with ``pad_crop`` = p > 0, first the CIFAR crop (zero padding of p pixels
    on each side, then a crop of the original size at a uniform offset in [0, 2p] per axis). Works on
    0-255 float batches; draws from its own seeded generator (the crop's draws only when it is on)."""

    def __init__(self, mirror: bool = True, color_shift: float = 10.0, grayscale_p: float = 0.1,
                 pad_crop: int = 0, seed: int = 0) -> None:
        super().__init__()
        if not color_shift >= 0:
            raise ValueError(f"augment.color_shift={color_shift} must be >= 0 (0 turns it off).")
        if not 0 <= grayscale_p <= 1:
            raise ValueError(f"augment.grayscale_p={grayscale_p} must be a probability in [0, 1].")
        if not isinstance(pad_crop, int) or pad_crop < 0:
            raise ValueError(f"augment.pad_crop={pad_crop} must be a whole number of pixels >= 0 (0 turns it off).")
        self.mirror, self.color_shift, self.grayscale_p, self.pad_crop = mirror, color_shift, grayscale_p, pad_crop
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        images = images.float()
        if self.pad_crop:
            images = self._pad_and_crop(images)
        flip = torch.rand(b, generator=self.generator) < (0.5 if self.mirror else 0.0)
        shift = (torch.rand(b, 3, generator=self.generator) * 2 - 1) * self.color_shift
        gray = torch.rand(b, generator=self.generator) < self.grayscale_p
        flip, shift, gray = (to_device(t, images.device) for t in (flip, shift, gray))
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        images = (images + shift[:, :, None, None]).clamp(0, 255)
        return torch.where(gray[:, None, None, None], luma(images).expand_as(images), images)

    def _pad_and_crop(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape
        p = self.pad_crop
        offsets = to_device(torch.randint(0, 2 * p + 1, (b, 2), generator=self.generator), images.device)
        padded = F.pad(images, (p, p, p, p))
        rows = (offsets[:, 0, None] + torch.arange(h, device=images.device))[:, None, :, None]
        cols = (offsets[:, 1, None] + torch.arange(w, device=images.device))[:, None, None, :]
        batch = torch.arange(b, device=images.device)[:, None, None, None]
        channel = torch.arange(c, device=images.device)[None, :, None, None]
        return padded[batch, channel, rows, cols]

    def varies(self) -> bool:
        """Whether two passes over one batch can differ (several views need that)."""
        return self.mirror or self.color_shift > 0 or self.grayscale_p > 0 or self.pad_crop > 0


# RGB -> YIQ (NTSC); a hue change rotates the (I, Q) chroma plane.
_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


class SimCLRAugment(nn.Module):
    """SimCLR's augmentation (Chen et al. 2020), used by the SEC paper's self-supervised rows (sec. 4.4):
    a random resized crop (area fraction in ``crop_scale``, aspect ratio in [3/4, 4/3], scaled back to the
    image size, bilinear), a horizontal mirror (``mirror``), colour jitter with probability ``jitter_p``
    (brightness, contrast and saturation factors in [1 - 0.8 s, 1 + 0.8 s], hue in [-0.2 s, 0.2 s] of a
    turn, applied in that order; s = ``strength``), grayscale with probability ``grayscale_p`` and a
    Gaussian blur (kernel 10% of the side, sigma in [0.1, 2.0] pixels) with probability ``blur_p``
    (SimCLR's CIFAR recipe leaves it out). 0-255 float batches in and out; its own seeded generator."""

    def __init__(self, mirror: bool = True, strength: float = 0.5, crop_scale: tuple[float, float] = (0.08, 1.0),
                 jitter_p: float = 0.8, grayscale_p: float = 0.2, blur_p: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        low, high = (float(v) for v in crop_scale)
        if not 0 < low <= high <= 1:
            raise ValueError(f"augment.crop_scale={list(crop_scale)} must be [low, high] with 0 < low <= high <= 1.")
        for key, value in (("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p)):
            if not 0 <= value <= 1:
                raise ValueError(f"augment.{key}={value} must be a probability in [0, 1].")
        if not 0 <= strength <= 1.25:
            raise ValueError(f"augment.strength={strength} must be in [0, 1.25] (factors stay positive).")
        self.mirror, self.strength, self.crop_scale = mirror, float(strength), (low, high)
        self.jitter_p, self.grayscale_p, self.blur_p = jitter_p, grayscale_p, blur_p
        self.generator = torch.Generator().manual_seed(seed)

    def varies(self) -> bool:
        return True

    def _uniform(self, b: int, low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=self.generator)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b = images.shape[0]
        x = images.float() / 255.0
        # crop box: its width and height as fractions of the image, its centre in [-1, 1] coordinates
        area = self._uniform(b, *self.crop_scale)
        ratio = torch.exp(self._uniform(b, math.log(3 / 4), math.log(4 / 3)))
        width, height = (area * ratio).sqrt(), (area / ratio).sqrt()
        fits = (width <= 1) & (height <= 1)  # a box that does not fit is the whole image
        width, height = torch.where(fits, width, 1.0), torch.where(fits, height, 1.0)
        centre_x = (self._uniform(b, -1.0, 1.0)) * (1 - width)
        centre_y = (self._uniform(b, -1.0, 1.0)) * (1 - height)
        mirrored = torch.rand(b, generator=self.generator) < (0.5 if self.mirror else 0.0)
        s = self.strength
        factors = [self._uniform(b, 1 - 0.8 * s, 1 + 0.8 * s) for _ in range(3)]
        hue = self._uniform(b, -0.2 * s, 0.2 * s)
        jitter = torch.rand(b, generator=self.generator) < self.jitter_p
        gray = torch.rand(b, generator=self.generator) < self.grayscale_p
        blur = torch.rand(b, generator=self.generator) < self.blur_p
        sigma = self._uniform(b, 0.1, 2.0)

        device = x.device
        x = crop_resized(x, width, height, centre_x, centre_y, mirrored)
        jittered = color_jitter(x, *(f.to(device) for f in factors), hue.to(device))
        x = torch.where(jitter.to(device)[:, None, None, None], jittered, x)
        x = torch.where(gray.to(device)[:, None, None, None], luma(x).expand_as(x), x)
        if blur.any():
            chosen = blur.nonzero().flatten().to(device)
            x[chosen] = gaussian_blur(x[chosen], sigma[blur].to(device), kernel_size(x.shape[-1]))
        return (x * 255.0).clamp(0, 255)


def crop_resized(x: torch.Tensor, width: torch.Tensor, height: torch.Tensor, centre_x: torch.Tensor,
                 centre_y: torch.Tensor, mirrored: torch.Tensor) -> torch.Tensor:
    """Per image, the box of ``width`` x ``height`` (fractions of the image) centred at (``centre_x``,
    ``centre_y``) in [-1, 1] coordinates, scaled to the image size (bilinear), mirrored where asked."""
    sign = torch.where(mirrored, -1.0, 1.0)
    theta = torch.zeros(len(x), 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * sign, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor, saturation: torch.Tensor,
                 hue: torch.Tensor) -> torch.Tensor:
    """Per image (factors [B]): scale by ``brightness``; move away from the mean luma by ``contrast``; away
    from the pixel's luma by ``saturation``; rotate the chroma by ``hue`` turns. [0, 1] RGB in and out."""
    x = (x * brightness[:, None, None, None]).clamp(0, 1)
    mean = luma(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * contrast[:, None, None, None] + mean).clamp(0, 1)
    gray = luma(x)
    x = ((x - gray) * saturation[:, None, None, None] + gray).clamp(0, 1)
    to_yiq = x.new_tensor(_YIQ)
    yiq = torch.einsum("ij,bjhw->bihw", to_yiq, x)
    angle = 2 * math.pi * hue
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    i, q = yiq[:, 1], yiq[:, 2]
    yiq = torch.stack([yiq[:, 0], i * cos - q * sin, i * sin + q * cos], dim=1)
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(to_yiq), yiq).clamp(0, 1)


def kernel_size(side: int) -> int:
    """SimCLR's blur kernel: 10% of the image side, odd, at least 3."""
    return max(3, int(0.1 * side) // 2 * 2 + 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Each image blurred by a separable Gaussian of its own ``sigma`` (pixels), ``size`` taps, borders
    reflected."""
    b, c, h, w = x.shape
    offsets = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
    kernels = torch.exp(-offsets[None] ** 2 / (2 * sigma[:, None] ** 2))
    kernels = kernels / kernels.sum(1, keepdim=True)  # [B, size]
    weight = kernels.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
    pad = size // 2
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (pad, pad, 0, 0), mode="reflect"), weight[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, pad, pad), mode="reflect"), weight[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


class ImageTransform:
    """Per-image work done in the DataLoader workers, before images of different sizes can be batched.

    ``resize``: the shorter side is scaled to it (aspect kept). ``crop``: training images get a random
    resized crop (area fraction in ``crop_scale``, aspect ratio in [3/4, 4/3], then scaled to crop x crop),
    evaluation images the centre crop: the DML convention is ``resize=256 crop=227`` (BN-Inception).
    A training image's draws come from ``seed`` (fixed per image slot by the loader), never a global RNG.
    Neither set: images pass unchanged (formats of one size: faces, emoji, MNIST, CIFAR).
    """

    def __init__(self, resize: int | None = None, crop: int | None = None,
                 crop_scale: tuple[float, float] = (0.08, 1.0)) -> None:
        for key, value in (("resize", resize), ("crop", crop)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{key}={value} must be a positive integer or null.")
        low, high = (float(v) for v in crop_scale)
        if not 0 < low <= high <= 1:
            raise ValueError(f"data.crop_scale={list(crop_scale)} must be [low, high] with 0 < low <= high <= 1.")
        self.resize, self.crop, self.crop_scale = resize, crop, (low, high)

    def __call__(self, image: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """uint8 [3, H, W] -> uint8 [3, h, w]; ``seed`` None: no randomness (evaluation)."""
        if self.resize is not None:
            image = _resize(image, self.resize)
        if self.crop is None:
            return image
        if seed is None:
            return _centre_crop(image, self.crop)
        top, left, height, width = self._random_box(image.shape[-2], image.shape[-1], seed)
        return _scaled(image[:, top:top + height, left:left + width], (self.crop, self.crop))

    def _random_box(self, height: int, width: int, seed: int) -> tuple[int, int, int, int]:
        generator = torch.Generator().manual_seed(seed)
        area = height * width
        log_ratio = torch.log(torch.tensor([3 / 4, 4 / 3]))
        for _ in range(10):
            target = area * float(torch.empty(1).uniform_(*self.crop_scale, generator=generator))
            ratio = float(torch.exp(torch.empty(1).uniform_(*log_ratio.tolist(), generator=generator)))
            w, h = round((target * ratio) ** 0.5), round((target / ratio) ** 0.5)
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
                return top, left, h, w
        side = min(height, width)  # no box fitted in 10 tries: the largest centred square
        return (height - side) // 2, (width - side) // 2, side, side


def _scaled(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    shrinking = image.shape[-2] > size[0] or image.shape[-1] > size[1]
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=shrinking)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def _resize(image: torch.Tensor, shorter: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    scale = shorter / min(height, width)
    return _scaled(image, (max(1, round(height * scale)), max(1, round(width * scale))))


def _centre_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    if height < size or width < size:  # smaller than the crop: scale up first (set data.resize to avoid it)
        image = _resize(image, size)
        height, width = image.shape[-2:]
    top, left = (height - size) // 2, (width - size) // 2
    return image[:, top:top + size, left:left + size]
