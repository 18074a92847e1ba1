"""Face verification packs (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``), as InsightFace ships them: a
pickle of ``(images, issame)`` where ``images`` lists 2 x pairs encoded images (pair i is images 2i and
2i + 1) and ``issame`` one boolean per pair. Python 2 packs use protocol 2 strings, Python 3 packs
protocol 4 / 5 bytes. Read by :func:`doppel.data.readers.safe_pickle.safe_load`: nothing in the file runs.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch

from doppel.data.dataset import BytesImages, DataError, require
from doppel.data.readers.safe_pickle import safe_load

SIGNATURES = {b"\xff\xd8\xff": "JPEG", b"\x89PNG\r\n\x1a\n": "PNG"}


@dataclass
class VerificationPairs:
    images: BytesImages  # 2 x pairs, pair i = images 2i, 2i + 1
    issame: torch.Tensor  # bool [pairs]
    source: str


def read_verification_bin(path: str | Path) -> VerificationPairs:
    path = require(path, "verification", "an InsightFace verification pack such as lfw.bin")
    loaded = safe_load(path.read_bytes(), str(path))
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
        raise DataError(f"{path}: holds a {type(loaded).__name__}, not the (images, issame) of a verification pack.")
    images, issame = loaded
    if not isinstance(images, list) or not isinstance(issame, list):
        raise DataError(f"{path}: images and issame must be lists.")
    if len(images) % 2:
        raise DataError(f"{path}: {len(images)} images, an odd number: pairs are two images each, so the pack is "
                        "truncated or damaged.")
    if len(images) != 2 * len(issame):
        raise DataError(f"{path}: {len(images)} images for {len(issame)} issame flags; a pack has 2 images per flag.")
    if not all(isinstance(flag, bool) for flag in issame):
        raise DataError(f"{path}: issame must hold booleans.")
    for i, image in enumerate(images):
        if not isinstance(image, (bytes, bytearray)) or not any(image.startswith(s) for s in SIGNATURES):
            raise DataError(f"{path}: image {i} (pair {i // 2}) is not JPEG or PNG data.")
    return VerificationPairs(BytesImages(images, str(path)), torch.tensor(issame, dtype=torch.bool), str(path))


def write_verification_bin(path: str | Path, images: list[bytes], issame: list[bool], protocol: int = 4) -> None:
    """Write a pack in InsightFace's layout (dumping plain data runs nothing)."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs: give 2 images per pair.")
    with open(path, "wb") as file:
        pickle.dump((list(images), [bool(s) for s in issame]), file, protocol=protocol)
