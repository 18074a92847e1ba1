"""The bundled emoji identity dataset: its on-disk format, loader and base / novel split.

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

from doppel.evaluation.protocol import Role
from doppel.seeding import stable_fraction

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


def check_novel_fraction(novel_fraction: float) -> None:
    if not 0 < novel_fraction < 1:
        raise ValueError(f"data.novel_fraction={novel_fraction} must be in (0, 1).")


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


@dataclass
class Split:
    """Images of the run with their evaluation role; ``label`` is the run's class index.

    Base (training) identities are labelled 0..num_classes-1, novel ones num_classes and up.
    """

    images: torch.Tensor  # uint8 [N, 3, H, W]
    label: torch.Tensor  # long [N]
    role: torch.Tensor  # long [N], values of Role
    names: list[str]  # per label
    num_classes: int  # base identities = classifier size

    def training_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels) of the images the network trains on."""
        mask = self.role == Role.BASE_TRAIN
        return self.images[mask], self.label[mask]


def split_emoji(data: EmojiArchive, novel_fraction: float = 0.2, prototype_vendor: str = "twitter",
                max_families: int | None = None) -> Split:
    """Held-out (novel) identities are whole families, chosen by a hash of the family key.

    Novel: the ``prototype_vendor`` image is the one-shot prototype, the others are queries.
    Base: an identity with 3 or more images keeps one (chosen by hash) out of training as its query.
    """
    check_novel_fraction(novel_fraction)
    vendors = [str(v) for v in data.vendor_name]
    if prototype_vendor not in vendors:
        raise ValueError(f"data.prototype_vendor={prototype_vendor!r} is not one of {vendors}.")
    proto_vendor = vendors.index(prototype_vendor)
    family_keys = [str(k) for k in data.family_key]
    families = sorted(range(len(family_keys)), key=lambda f: stable_fraction("pick:" + family_keys[f]))
    if max_families is not None:
        families = families[:max_families]
    kept_families = set(families)
    novel_family = {f for f in families if stable_fraction(family_keys[f]) < novel_fraction}

    images_of: dict[int, list[int]] = {}
    for image, identity in enumerate(data.identity.tolist()):
        if int(data.identity_family[identity]) in kept_families:
            images_of.setdefault(identity, []).append(image)

    base, novel = [], []
    for identity, images in sorted(images_of.items()):
        if len(images) < 2:
            continue  # an identity with one image can be neither trained on with pairs nor queried
        is_novel = int(data.identity_family[identity]) in novel_family
        if is_novel and proto_vendor not in data.vendor[images].tolist():
            continue
        (novel if is_novel else base).append(identity)
    if len(base) < 2 or not novel:
        raise ValueError(f"the split has {len(base)} base and {len(novel)} novel identities; raise "
                         f"data.max_families or change data.novel_fraction.")

    label_of = {identity: i for i, identity in enumerate(base + novel)}
    rows, labels, roles = [], [], []
    for identity in base:
        images = images_of[identity]
        held_out = images[int(stable_fraction(str(data.identity_code[identity])) * len(images))] \
            if len(images) >= 3 else None
        for image in images:
            rows.append(image)
            labels.append(label_of[identity])
            roles.append(Role.BASE_TEST if image == held_out else Role.BASE_TRAIN)
    for identity in novel:
        images = images_of[identity]
        proto = next(i for i in images if data.vendor[i] == proto_vendor)
        for image in images:
            rows.append(image)
            labels.append(label_of[identity])
            roles.append(Role.NOVEL_PROTOTYPE if image == proto else Role.NOVEL_QUERY)
    pixels = torch.from_numpy(data.images[np.asarray(rows)]).permute(0, 3, 1, 2).contiguous()
    return Split(
        images=pixels,
        label=torch.tensor(labels, dtype=torch.long),
        role=torch.tensor([int(r) for r in roles], dtype=torch.long),
        names=[str(data.identity_name[i]) for i in base + novel],
        num_classes=len(base),
    )
