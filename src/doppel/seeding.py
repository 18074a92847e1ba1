"""Numbers fixed by their inputs alone: no RNG state, no ``hash()`` (whose value Python may change
between versions), no library version. Splits and random streams derive from them."""

from __future__ import annotations

import hashlib


def _digest64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key``."""
    return _digest64(key) / 2**64


def stable_seed(*parts: object) -> int:
    """A 63-bit seed fixed by ``parts`` (e.g. seed, epoch, rank): distinct streams for distinct tuples."""
    return _digest64(":".join(str(p) for p in parts)) >> 1
