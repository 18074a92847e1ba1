"""Numbers fixed by their inputs alone: no RNG state, no ``hash()`` (whose value Python may change
between versions), no library version. Splits and random streams derive from them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn


def _digest64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def stable_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key``."""
    return _digest64(key) / 2**64


def stable_fractions(keys: Iterable[str]) -> np.ndarray:
    """``stable_fraction`` of every key, as float64 (millions of keys: no Python float per key)."""
    digests = b"".join(hashlib.sha256(key.encode()).digest()[:8] for key in keys)
    return np.frombuffer(digests, ">u8").astype(np.float64) / 2**64


def stable_seed(*parts: object) -> int:
    """A 63-bit seed fixed by ``parts`` (e.g. seed, epoch, rank): distinct streams for distinct tuples."""
    return _digest64(":".join(str(p) for p in parts)) >> 1


def named_generators(module: nn.Module) -> dict[str, torch.Generator]:
    """Every ``torch.Generator`` held as an attribute by ``module`` or a submodule, by dotted name."""
    found = {}
    for prefix, submodule in module.named_modules():
        for attribute, value in vars(submodule).items():
            if isinstance(value, torch.Generator):
                found[f"{prefix}.{attribute}" if prefix else attribute] = value
    return found


def seed_for_rank(module: nn.Module, rank: int) -> None:
    """Give process ``rank`` its own stream in every generator of ``module`` (augmentation, pair sampling),
    derived from the seed each was built with; rank 0 keeps it, so one process draws as before."""
    if rank == 0:
        return
    for name, generator in named_generators(module).items():
        generator.manual_seed(stable_seed(generator.initial_seed(), name, rank))
