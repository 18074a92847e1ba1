"""Checkpoints of runs: where a run resumes from, how Lightning reads and writes them, whether one fits.

Reading: local files only (a remote ``ckpt_path`` is refused: nothing is downloaded at run time), with
:func:`doppel.serialization.load_checkpoint`; writing with :func:`doppel.serialization.atomic_save`.
Fitting: a checkpoint resumes only the Doppel run that wrote it (its ``doppel`` entry holds that run's
config); the data, backbone and loss must be the same, every tensor finite, every shape as built.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from doppel.serialization import CheckpointError, atomic_save, load_checkpoint

STAMP = "doppel"
FORMAT = 1
LAST = "last.ckpt"
# Settings that decide what the weights mean: a checkpoint made with others cannot be resumed.
DEFINING = ("data.", "backbone.", "loss.terms.", "regularizer.", "doppel.top_k")
# Settings of one invocation (where it runs, how it loads), never a difference between runs.
# Where the data lies is one too: a requeued job may copy it to another node's local disk.
LOCAL = ("paths.", "ckpt_path", "data.num_workers", "data.eval_batch_size", "data.pin_memory",
         "data.persistent_workers", "data.prefetch_factor", "data.root", "data.path", "data.idx", "callbacks.",
         "logger.",
         "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.default_root_dir",
         "eval.", "objective")  # evaluation never changes training: a resumed run may score differently
_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def resolve_ckpt_path(value: str | None, run_dir: str | Path) -> Path | None:
    """``ckpt_path``: null (a new run), ``auto`` (the run directory's last.ckpt if there is one: what a
    requeued SLURM job needs) or a local file."""
    if value is None:
        return None
    if str(value) == "auto":
        last = checkpoint_dir(run_dir) / LAST
        return last if last.is_file() else None
    if _REMOTE.match(str(value)) and not str(value).startswith("file://"):
        raise CheckpointError(f"ckpt_path={value} is a remote address: Doppel reads checkpoints from local files only "
                              "(nothing is downloaded at run time); download it and pass its local path.")
    path = Path(str(value).removeprefix("file://"))
    if path.is_dir():
        inside = next((p for p in (path / LAST, checkpoint_dir(path) / LAST) if p.is_file()), None)
        raise FileNotFoundError(f"ckpt_path={str(path)!r} is a folder, not a checkpoint file: give "
                                + (f"{str(inside)!r}" if inside else "the checkpoint file in it (e.g. "
                                   "<run>/checkpoints/last.ckpt)") + ", or ckpt_path=auto to resume this run's.")
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist; give the path of a checkpoint "
                                "(e.g. <run>/checkpoints/last.ckpt) or ckpt_path=auto.")
    return path


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reader and writer with :func:`load_checkpoint` and :func:`atomic_save`.

    ``preloaded``: a (path, checkpoint) that ``train()`` already read and checked, handed to Lightning
    instead of reading the file twice.
    """

    def __init__(self, preloaded: tuple[Path, dict[str, Any]] | None = None) -> None:
        self._preloaded = preloaded

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("SafeCheckpointIO writes local files and takes no storage_options.")
        atomic_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if self._preloaded is not None and Path(path) == self._preloaded[0]:
            checkpoint, self._preloaded = self._preloaded[1], None
            return checkpoint
        return load_checkpoint(resolve_ckpt_path(str(path), "."))


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` for every leaf of a nested config (lists are leaves)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every setting that differs, local ones left out."""
    before, after = flat_config(saved), flat_config(current)
    missing = object()
    return [(key, before.get(key, missing), after.get(key, missing)) for key in sorted(before.keys() | after.keys())
            if not key.startswith(LOCAL) and before.get(key, missing) != after.get(key, missing)]


def _describe(differences: list[tuple[str, Any, Any]]) -> str:
    def show(value: Any) -> str:
        return "unset" if not isinstance(value, (str, int, float, bool, list, type(None))) else repr(value)

    return ", ".join(f"{key}: {show(old)} -> {show(new)}" for key, old, new in differences[:6]) + (
        f" and {len(differences) - 6} more" if len(differences) > 6 else "")


def check_checkpoint(checkpoint: Mapping[str, Any], config: Mapping[str, Any], name: str) -> None:
    """Before anything is built: a Doppel checkpoint of this run, with finite tensors.

    A difference in a :data:`DEFINING` setting is an error; any other difference (e.g. ``optim.lr``) is
    allowed with a warning, since the resumed run is then no longer the run it continues.
    """
    stamp = checkpoint.get(STAMP)
    if not isinstance(stamp, Mapping) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{name} was not written by a Doppel run (it has no {STAMP!r} entry): ckpt_path "
                              "resumes Doppel runs only; to start from other weights use backbone.checkpoint.")
    if stamp.get("format") != FORMAT:
        raise CheckpointError(f"{name} has checkpoint format {stamp.get('format')}, this Doppel reads format "
                              f"{FORMAT}: resume it with the Doppel version that wrote it.")
    differences = config_differences(stamp["config"], config)
    defining = [d for d in differences if d[0].startswith(DEFINING) and not d[0].endswith(".seed")]
    if defining:
        raise CheckpointError(f"{name} was made by another run ({_describe(defining)}): resume with the settings "
                              "that wrote it, or start a new run.")
    if differences:
        warnings.warn(f"resuming {name} with changed settings ({_describe(differences)}): the resumed run is not "
                      "the run it continues.", stacklevel=2)
    check_finite(checkpoint, name)


def check_finite(checkpoint: Mapping[str, Any], name: str) -> None:
    """Every floating-point tensor of ``checkpoint`` finite (weights to resume, fine-tune or evaluate)."""
    for where, tensor in _tensors(checkpoint):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            bad = int((~torch.isfinite(tensor)).sum())
            raise CheckpointError(f"{name} has {bad} non-finite values in {where}: the run had diverged before it "
                                  "was saved (or the file was altered); use an earlier checkpoint.")


def check_same_data(checkpoint: Mapping[str, Any], num_classes: int, name: str) -> None:
    """The data read now has the classes the checkpoint's run trained on (same settings, other files:
    e.g. ``data.root`` moved to a copy that differs)."""
    saved = checkpoint.get(STAMP, {}).get("classes")
    if saved is not None and saved != num_classes:
        raise CheckpointError(f"{name} was trained on {saved} classes and the data read now has {num_classes}: "
                              "data.root / data.path name other files than that run's; resume with its data.")


def check_state_dict(checkpoint: Mapping[str, Any], expected: Mapping[str, torch.Tensor], name: str) -> None:
    """Every parameter and buffer of the built model is in the checkpoint with the same shape, and no other."""
    saved = checkpoint["state_dict"]
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{name} does not fit the model this config builds: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}.")
    for key, tensor in expected.items():
        if tuple(saved[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{name} does not fit the model this config builds: {key} is "
                                  f"{list(saved[key].shape)} in the checkpoint and {list(tensor.shape)} here.")


def copy_matching_weights(checkpoint: Mapping[str, Any], model: torch.nn.Module, name: str) -> list[str]:
    """Fine-tuning: the backbone entire, and every loss-head tensor of the same name and shape (a new term,
    or one the checkpoint lacks, keeps its initialisation). Returns the model's tensors left as they were.
    Refuses a checkpoint whose backbone is not this config's, tensor for tensor."""
    saved = checkpoint.get("state_dict") if isinstance(checkpoint, Mapping) else None
    if not isinstance(saved, Mapping):
        raise CheckpointError(f"{name} has no state_dict: it is not a checkpoint written by a Doppel run.")
    own = model.state_dict()
    for key in (k for k in own if k.startswith("backbone.")):
        if key not in saved or tuple(saved[key].shape) != tuple(own[key].shape):
            found = list(saved[key].shape) if key in saved else "absent"
            raise CheckpointError(f"{name}: its backbone does not fit the one this config builds ({key}: "
                                  f"{found} there, {list(own[key].shape)} here); set backbone.* as in its run.")
    fits = {k: v for k, v in saved.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(fits, strict=False)
    return [k for k in own if k not in fits]


def _tensors(tree: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        yield where, tree
    elif isinstance(tree, Mapping):
        for key, value in tree.items():
            yield from _tensors(value, f"{where}.{key}" if where else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _tensors(value, f"{where}[{i}]")

