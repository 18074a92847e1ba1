"""Reader of the bundled rendered identity datasets (``data=cjk``, ``data=emoji``).

Every identity is drawn by several renderers (emoji vendors, typefaces); each drawing is one image of it.
Format (one ``.npz``, written by ``scripts/build_cjk_dataset.py`` or ``scripts/build_emoji_dataset.py``):
``images`` uint8 [N, H, W, 3] (RGB) or [N, H, W, 1] (grey); ``identity`` int32 [N]; ``vendor`` int8 [N]
(the renderer); ``identity_code`` / ``identity_name`` str [I]; ``identity_family`` int32 [I];
``family_key`` str [F]; ``vendor_name`` str [V]; optional ``lookalike`` int32 [I, K]: each identity's
known look-alikes (the characters' nearest in pixel space).
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
BUILDERS = {"emoji32.npz": "scripts/build_emoji_dataset.py", "cjk32.npz": "scripts/build_cjk_dataset.py"}


def bundled_path(name: str) -> Path:
    if name not in BUILDERS:
        raise DataError(f"data.bundled={name!r} is not a bundled file; choose one of {sorted(BUILDERS)}.")
    return Path(str(resources.files("doppel.data") / "assets" / name))


@dataclass
class RenderedArchive:
    images: np.ndarray
    identity: np.ndarray
    vendor: np.ndarray
    identity_code: np.ndarray
    identity_name: np.ndarray
    identity_family: np.ndarray
    family_key: np.ndarray
    vendor_name: np.ndarray
    lookalike: np.ndarray | None = None


def resolve_path(path: str | Path | None, bundled: str) -> Path:
    """``data.path``: a file in this format, or null for the bundled file ``data.bundled``."""
    path = Path(path) if path else bundled_path(bundled)
    if not path.is_file():
        raise FileNotFoundError(f"data.path={str(path)!r} does not exist; leave it null for the bundled "
                                f"{bundled} or build one with {BUILDERS.get(bundled, 'the builder scripts')}.")
    return path


def load_rendered_npz(path: str | Path | None = None, bundled: str = "emoji32.npz") -> RenderedArchive:
    path = resolve_path(path, bundled)
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in REQUIRED if key not in archive]
        if missing:
            raise ValueError(f"{path} lacks arrays {missing}: it was not written by a scripts/build_*_dataset.py.")
        data = RenderedArchive(**{key: archive[key] for key in REQUIRED},
                               lookalike=archive["lookalike"] if "lookalike" in archive else None)
    if data.images.dtype != np.uint8 or data.images.ndim != 4 or data.images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: images must be uint8 [N, H, W, 3] or [N, H, W, 1], "
                         f"got {data.images.dtype} {data.images.shape}.")
    if not len(data.images) == len(data.identity) == len(data.vendor):
        raise ValueError(f"{path}: images, identity and vendor have different lengths.")
    if len(data.identity) and (data.identity.min() < 0 or data.identity.max() >= len(data.identity_code)):
        raise ValueError(f"{path}: identity indices outside [0, {len(data.identity_code)}).")
    if data.lookalike is not None and (data.lookalike.ndim != 2 or len(data.lookalike) != len(data.identity_code)
                                       or data.lookalike.max(initial=0) >= len(data.identity_code)):
        raise ValueError(f"{path}: lookalike must be int [identities, K] of identity indices (-1: none).")
    return data


def read_rendered_npz(path: str | Path | None = None, bundled: str = "emoji32.npz",
                      prototype_vendor: str = "twitter") -> IdentityData:
    """Each identity is a class, its family (emoji skin tones, genders, hair) its group, and the
    ``prototype_vendor`` drawing the one-shot prototype of a held-out identity."""
    data = load_rendered_npz(path, bundled)
    vendors = [str(v) for v in data.vendor_name]
    if prototype_vendor not in vendors:
        raise DataError(f"data.prototype_vendor={prototype_vendor!r} is not one of {vendors}.")
    family_keys = [str(k) for k in data.family_key]
    pixels = torch.from_numpy(data.images).permute(0, 3, 1, 2)
    return IdentityData(
        labels=torch.from_numpy(data.identity.astype(np.int64)),
        class_names=[str(n) for n in data.identity_name],
        images=TensorImages(pixels.expand(-1, 3, -1, -1).contiguous()),  # grey: repeated into 3 channels
        source=str(path) if path else f"the bundled {bundled}",
        groups=[family_keys[f] for f in data.identity_family.tolist()],
        class_keys=[str(c) for c in data.identity_code],
        prototype_preference=torch.from_numpy(data.vendor == vendors.index(prototype_vendor)),
        lookalikes=None if data.lookalike is None else [[int(c) for c in row if c >= 0] for row in data.lookalike],
    )
