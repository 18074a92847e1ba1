"""Reader of the bundled emoji identity dataset (``data=emoji``).

Format (one ``.npz``, written by ``scripts/build_emoji_dataset.py``):
``images`` uint8 [N, H, W, 3]; ``identity`` int32 [N]; ``vendor`` int8 [N];
``identity_code`` / ``identity_name`` str [I]; ``identity_family`` int32 [I]; ``family_key`` str [F];
``vendor_name`` str [V]. Each emoji is an identity, each vendor's drawing one image of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from doppel.data.dataset import DataError, IdentityData, TensorImages

REQUIRED = ("images", "identity", "vendor", "identity_code", "identity_name", "identity_family",
            "family_key", "vendor_name")
BUNDLED = "emoji32.npz"


def bundled_path() -> Path:
    return Path(str(resources.files("doppel.data") / "assets" / BUNDLED))


@dataclass
class EmojiArchive:
    images: np.ndarray
    identity: np.ndarray
    vendor: np.ndarray
    identity_code: np.ndarray
    identity_name: np.ndarray
    identity_family: np.ndarray
    family_key: np.ndarray
    vendor_name: np.ndarray


def resolve_path(path: str | Path | None) -> Path:
    """``data.path``: a file in this format, or null for the bundled set."""
    path = Path(path) if path else bundled_path()
    if not path.is_file():
        raise FileNotFoundError(f"data.path={str(path)!r} does not exist; leave it null for the bundled emoji "
                                f"set or build one with scripts/build_emoji_dataset.py.")
    return path


def load_emoji_npz(path: str | Path | None = None) -> EmojiArchive:
    path = resolve_path(path)
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in REQUIRED if key not in archive]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing}: it was not written by build_emoji_dataset.py.")
        data = EmojiArchive(**{key: archive[key] for key in REQUIRED})
    if data.images.dtype != np.uint8 or data.images.ndim != 4 or data.images.shape[-1] != 3:
        raise ValueError(f"{path}: images must be uint8 [N, H, W, 3], got {data.images.dtype} {data.images.shape}.")
    if not len(data.images) == len(data.identity) == len(data.vendor):
        raise ValueError(f"{path}: images, identity and vendor have different lengths.")
    if len(data.identity) and (data.identity.min() < 0 or data.identity.max() >= len(data.identity_code)):
        raise ValueError(f"{path}: identity indices outside [0, {len(data.identity_code)}).")
    return data


def read_emoji_npz(path: str | Path | None = None, prototype_vendor: str = "twitter") -> IdentityData:
    """Each emoji is a class, its family (skin tones, genders, hair) its group, and the
    ``prototype_vendor`` drawing the one-shot prototype of a held-out emoji."""
    data = load_emoji_npz(path)
    vendors = [str(v) for v in data.vendor_name]
    if prototype_vendor not in vendors:
        raise DataError(f"data.prototype_vendor={prototype_vendor!r} is not one of {vendors}.")
    family_keys = [str(k) for k in data.family_key]
    return IdentityData(
        labels=torch.from_numpy(data.identity.astype(np.int64)),
        class_names=[str(n) for n in data.identity_name],
        images=TensorImages(torch.from_numpy(data.images).permute(0, 3, 1, 2).contiguous()),
        source=str(path) if path else f"the bundled {BUNDLED}",
        groups=[family_keys[f] for f in data.identity_family.tolist()],
        class_keys=[str(c) for c in data.identity_code],
        prototype_preference=torch.from_numpy(data.vendor == vendors.index(prototype_vendor)),
    )
