"""Shared fixtures: a tiny emoji-format dataset written by the test, and composed train configs."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from doppel.train import CONFIG_DIR

CONFIGS = str(CONFIG_DIR)
ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # Under pytest-xdist, share the cores between the workers: each worker, and the train.py processes it
    # starts (they inherit the environment), gets its share of threads instead of all of them.
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def load_script(name: str) -> ModuleType:
    """Import ``scripts/<name>.py`` (scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module

# A small network and short run: seconds on one CPU core.
TINY = [
    "backbone.stem_channels=8",
    "backbone.widths=[8,16,16,16]",
    "backbone.depths=[1,1,1,1]",
    "backbone.embedding_dim=16",
    "sampler.batch_size=24",
    "sampler.examples_per_class=[2,4]",
    "data.max_groups=60",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "trainer.check_val_every_n_epoch=1",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "lsuv.batch_size=64",
    "trainer.log_every_n_steps=1",
]


def write_emoji_npz(path: Path, n_families: int = 12, size: int = 16, seed: int = 0) -> Path:
    """A dataset in the exact format of scripts/build_emoji_dataset.py: families of 1-3 identities,
    each drawn by 2-4 vendors; an identity is a coarse colour pattern under noise and a vendor cast."""
    rng = np.random.default_rng(seed)
    images, identity, vendor, codes, names, family_of, family_keys = [], [], [], [], [], [], []
    for f in range(n_families):
        family_keys.append(f"F{f:03X}")
        for member in range(1 + f % 3):
            ident = len(codes)
            codes.append(f"F{f:03X}-1F3F{member}" if member else f"F{f:03X}")
            names.append(f"emoji {f}.{member}")
            family_of.append(f)
            pattern = rng.normal(0, 50, (4, 4, 3)).repeat(size // 4, 0).repeat(size // 4, 1)
            for v in range(2 + (ident % 3)):
                # vendor-wide colour cast and strong pixel noise: raw pixels do not identify an emoji
                cast = np.random.default_rng(100 + v).normal(0, 10, 3)
                noise = rng.normal(0, 45, (size, size, 3))
                images.append(np.clip(128 + pattern + cast + noise, 0, 255).astype(np.uint8))
                identity.append(ident)
                vendor.append(v)
    np.savez_compressed(
        path, images=np.stack(images), identity=np.asarray(identity, np.int32), vendor=np.asarray(vendor, np.int8),
        identity_code=np.asarray(codes), identity_name=np.asarray(names),
        identity_family=np.asarray(family_of, np.int32), family_key=np.asarray(family_keys),
        vendor_name=np.asarray(["twitter", "google", "openmoji_color", "openmoji_outline"]),
    )
    return path


@pytest.fixture
def tiny_npz(tmp_path: Path) -> Path:
    return write_emoji_npz(tmp_path / "tiny.npz")


# Pictures (the diagnostics callback and report.html) cost seconds per tiny run; tests that are not about
# them leave them out (tests/callbacks and the CLI tests keep them).
NO_PICTURES = ["~callbacks.diagnostics", "report=false"]


def compose_cfg(tmp_path: Path, overrides: list[str] = (), tiny_backbone: bool = True,
                pictures: bool = False, config_name: str = "train") -> DictConfig:
    """``train.yaml`` with :data:`TINY` and ``overrides``; ``tiny_backbone=False`` keeps the chosen
    backbone's own size (TINY's ``backbone.*`` keys are Face-ResNet's); ``pictures`` keeps the diagnostics
    and the report."""
    tiny = TINY if tiny_backbone else [o for o in TINY if not o.startswith("backbone.")]
    tiny = tiny if pictures else [*tiny, *NO_PICTURES]
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        cfg = compose(config_name, overrides=[*tiny, *overrides], return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
    return cfg


def free_port() -> int:
    """A free TCP port on this machine for a test's gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
