"""What every reader returns: the label of every image, the classes, and lazy access to the pixels.

Samplers only ever see :attr:`IdentityData.labels` (an int64 tensor: cheap at millions of images);
pixels are decoded one image at a time, in DataLoader workers, from whatever the format stores.
"""

from __future__ import annotations

import io
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class Part(IntEnum):
    """What an image is for: which part of the run's split it is in, as the files define it (or the split
    decides).

    The first four are what a split holds. They say what the data is, not how it is scored: the
    evaluation protocols decide that (the prototype protocol averages TRAIN images into class
    prototypes, retrieval searches REFERENCE images with QUERY images, closed-set classification scores
    HELD_OUT images). The last two occur only in a reader's ``IdentityData.parts``, before the split
    resolves them.
    """

    TRAIN = 0  # trained on
    HELD_OUT = 1  # an image of a trained class kept out of training (a test image of that class)
    REFERENCE = 2  # an image of a test class given as its reference (gallery item, one-shot prototype)
    QUERY = 3  # an image of a test class to be searched / identified
    TEST_CLASS = -1  # an image of a test class whose role the file does not state: the split decides
    UNUSED = -2  # in no split of the run (e.g. CUB's test images with split=train)


def in_parts(values: torch.Tensor, parts: set[Part] | set[int]) -> torch.Tensor:
    """Which of ``values`` (Part values, one per image) are in any of ``parts``."""
    return torch.isin(values, torch.tensor(sorted(int(p) for p in parts), dtype=values.dtype))



class DataError(ValueError):
    """A data file that cannot be used as it is; the message names the file, the record and the fix."""


class ImageSource(Protocol):
    """Random access to the images of a dataset, decoded to uint8 [3, H, W] RGB."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> torch.Tensor: ...


class ImageSet(Protocol):
    """Images a protocol needs embedded besides the split's, in its own order (a verification pack's pairs,
    an IJB release's faces)."""

    @property
    def images(self) -> ImageSource: ...


@dataclass
class IdentityData:
    """A dataset of identities, as every reader returns it.

    ``groups`` puts known look-alike classes together (emoji skin-tone families): a split never separates
    a group. ``class_keys`` are the stable strings the split hashes (default: the names). ``parts``, when
    the format defines its splits (CUB's test classes, In-Shop's query / gallery), holds a :class:`Part`,
    ``Part.TEST_CLASS`` or ``Part.UNUSED`` per image. ``benchmark`` names a published benchmark the data is
    (``cub``, ``sop``, ...): the protocols take its conventions (e.g. the K of Recall@K).
    ``prototype_preference`` marks, per image, the one to take as a held-out class's prototype (emoji: the
    Twemoji drawing); otherwise its first image is. ``lookalikes`` lists, per class, the classes known to
    look like it (the CJK characters' nearest in pixel space); without it, the other classes of its group.
    """

    labels: torch.Tensor  # int64 [N]
    class_names: list[str]
    images: ImageSource
    source: str  # the file or folder, for messages
    groups: list[str] | None = None
    class_keys: list[str] | None = None
    parts: torch.Tensor | None = None
    prototype_preference: torch.Tensor | None = None
    benchmark: str | None = None
    lookalikes: list[list[int]] | None = None

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        if len(self.labels) != len(self.images):
            raise DataError(f"{self.source}: {len(self.labels)} labels for {len(self.images)} images.")
        if len(self.labels) == 0:
            raise DataError(f"{self.source} holds no images: check data.path / data.root.")
        low, high = int(self.labels.min()), int(self.labels.max())
        if low < 0 or high >= len(self.class_names):
            raise DataError(f"{self.source}: labels span [{low}, {high}] but there are {len(self.class_names)} "
                            "classes; the file's labels and class list disagree.")
        for name, per_class in (("groups", self.groups), ("class_keys", self.class_keys),
                                ("lookalikes", self.lookalikes)):
            if per_class is not None and len(per_class) != len(self.class_names):
                raise DataError(f"{self.source}: {len(per_class)} {name} for {len(self.class_names)} classes.")

    @property
    def keys(self) -> list[str]:
        return self.class_keys if self.class_keys is not None else self.class_names

    def known_lookalikes(self) -> list[set[int]] | None:
        """Per class, the classes known to look like it: ``lookalikes``, else the other members of its group
        (None when the data knows none)."""
        if self.lookalikes is not None:
            return [set(row) - {cls} for cls, row in enumerate(self.lookalikes)]
        if self.groups is None:
            return None
        members: dict[str, set[int]] = {}
        for cls, group in enumerate(self.groups):
            members.setdefault(group, set()).add(cls)
        if all(len(m) == 1 for m in members.values()):
            return None
        return [members[group] - {cls} for cls, group in enumerate(self.groups)]


class TensorImages:
    """Images held in memory as one uint8 [N, 3, H, W] tensor (small sets: emoji, MNIST, CIFAR)."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]


def decode(data: bytes, where: str) -> torch.Tensor:
    """Encoded JPEG / PNG / WebP / GIF / BMP bytes -> uint8 [3, H, W] RGB (Pillow, libjpeg-turbo); ``where``
    names the file or record in the error a corrupt or truncated image raises."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.array(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise CorruptImage(f"{where} is not a readable image ({str(error).splitlines()[0]}): replace or remove it, "
                           "or set data.skip_corrupt=true to skip unreadable images.", where) from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


class CorruptImage(DataError):
    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


class EncodedImages(ABC):
    """Images stored encoded (files, records, pickled bytes), decoded on access. Subclasses say how to
    ``fetch`` image ``i``'s bytes and how to ``name`` it in messages; they hold plain data only, so they
    pickle into DataLoader workers under any start method."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def fetch(self, index: int) -> bytes: ...

    @abstractmethod
    def name(self, index: int) -> str: ...

    def __getitem__(self, index: int) -> torch.Tensor:
        return decode(self.fetch(index), self.name(index))


class BytesImages(EncodedImages):
    """Encoded images held in a list (a verification pack's)."""

    def __init__(self, images: list[bytes], source: str) -> None:
        self.images, self.source = images, source

    def __len__(self) -> int:
        return len(self.images)

    def fetch(self, index: int) -> bytes:
        return self.images[index]

    def name(self, index: int) -> str:
        return f"{self.source} image {index}"


class FileImages(EncodedImages):
    """One image file per image."""

    def __init__(self, paths: Sequence[str]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, index: int) -> str:
        return self.paths[index]

    def fetch(self, index: int) -> bytes:
        try:
            with open(self.paths[index], "rb") as file:
                return file.read()
        except OSError as error:
            raise CorruptImage(f"{self.paths[index]} cannot be read ({error.strerror}): restore the file or "
                               "set data.skip_corrupt=true to skip unreadable images.", self.paths[index]) from None


# Where readers look when data.root / data.path is not given: $DOPPEL_DATA/<the format's usual name>.
DATA_ENV = "DOPPEL_DATA"


def require(path: str | Path | None, key: str, what: str, usual_name: str | None = None) -> Path:
    """The existing file or folder ``data.<key>`` names (else ``$DOPPEL_DATA/<usual_name>``); one sentence
    naming the key, the path and the fix otherwise."""
    if path is None and usual_name and os.environ.get(DATA_ENV):
        path = Path(os.environ[DATA_ENV]) / usual_name
    if path is None:
        hint = f" (or set {DATA_ENV} to the folder that holds {usual_name})" if usual_name else ""
        raise FileNotFoundError(f"data.{key} is not set: point it at {what}{hint}.")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data.{key}={str(path)!r} does not exist: point it at {what}.")
    return path
