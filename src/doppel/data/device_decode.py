"""``data.decode=gpu``: the loader's workers only read each image's bytes; the batch is decoded where it
trains, JPEGs by nvJPEG (``torchvision.io.decode_jpeg(device="cuda")``), after it has moved there.

A worker hands over an :class:`EncodedBatch`: per image its JPEG bytes (or, for the odd PNG or WebP of a
folder, the pixels it decoded itself), the seed of its random crop and its name. Lightning moves the
labels and leaves the batch alone (it is not a tensor or a collection); :func:`decode_batch` then decodes
and crops on the device, with the same seeds as :class:`~doppel.data.transforms.ImageTransform` in a worker,
so the two paths give the same training tensors up to the decoders' rounding (nvJPEG against
libjpeg-turbo: a few levels at most on a pixel, docs/data.md).
"""

from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from doppel.data.dataset import CorruptImage, decode
from doppel.data.transforms import ImageTransform

JPEG_MAGIC = b"\xff\xd8\xff"


class EncodedBatch:
    """A training batch before decoding. Deliberately not a tensor, dataclass or sequence: Lightning's
    transfer leaves it on the host, where ``decode_jpeg`` wants its input."""

    def __init__(self, items: list[torch.Tensor], seeds: list[int | None], names: list[str]) -> None:
        self.items, self.seeds, self.names = items, seeds, names

    def __len__(self) -> int:
        return len(self.items)


def read_encoded(data: bytes, where: str) -> torch.Tensor:
    """What a worker hands over for one image: a JPEG's bytes as uint8 [N]; anything else decoded here
    (uint8 [3, H, W]), since nvJPEG reads JPEG only."""
    if data[:3] == JPEG_MAGIC:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode(data, where)


def collate_encoded(samples: list[tuple[torch.Tensor, int | None, str, int]]) -> tuple[EncodedBatch, torch.Tensor]:
    items, seeds, names, labels = zip(*samples)
    return EncodedBatch(list(items), list(seeds), list(names)), torch.tensor(labels)


def decode_batch(batch: EncodedBatch, transform: ImageTransform, device: torch.device) -> torch.Tensor:
    """uint8 [B, 3, h, w] on ``device``: the JPEGs decoded together there (nvJPEG on a GPU, libjpeg-turbo on
    the CPU), then each image resized and cropped with its seed. A corrupt JPEG is named."""
    jpegs = [i for i, item in enumerate(batch.items) if item.dim() == 1]
    images: list[torch.Tensor | None] = [None if item.dim() == 1 else item.to(device, non_blocking=True)
                                         for item in batch.items]
    if jpegs:
        try:
            decoded = decode_jpeg([batch.items[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            raise _corrupt(batch, jpegs, device) from None
        for i, image in zip(jpegs, decoded):
            images[i] = image
    images = [transform(image, seed) for image, seed in zip(images, batch.seeds)]
    sizes = {tuple(image.shape) for image in images}
    if len(sizes) > 1:
        raise CorruptImage(f"the images of a batch have different sizes {sorted(sizes)[:3]}: set data.resize and "
                           "data.crop so that every image is cropped to one size.")
    return torch.stack(images)


def _corrupt(batch: EncodedBatch, jpegs: list[int], device: torch.device) -> CorruptImage:
    """The first JPEG of the batch that does not decode alone (the batch's decode failed as a whole)."""
    for i in jpegs:
        try:
            decode_jpeg(batch.items[i], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as error:
            where = batch.names[i]
            return CorruptImage(f"{where} is not a readable JPEG ({str(error).splitlines()[0]}): replace or remove "
                                "it (data.skip_corrupt needs data.decode=cpu).", where)
    return CorruptImage(f"a batch of {len(jpegs)} JPEGs failed to decode on {device} together but each decodes "
                        "alone: rerun with data.decode=cpu and report it.")
