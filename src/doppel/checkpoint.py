"""Checkpoints of runs: where a run resumes from, how Lightning reads and writes them, whether one fits.

Reading: local files only (a remote ``ckpt_path`` is refused: nothing is downloaded at run time), with
:func:`doppel.serialization.load_checkpoint`; writing with :func:`doppel.serialization.atomic_save`.
Fitting: a checkpoint resumes only the Doppel run that wrote it (its ``doppel`` entry holds that run's
config); the data, backbone and loss must be the same, every tensor finite, every shape as built.

Class shards: a sharded classifier's rows (weights and their optimizer state) are written by each process
to its own file in a folder beside the checkpoint, ``last.ckpt.classes/step<N>-<token>/rank<r>-of<W>.pt``,
which the checkpoint names (its ``class_shards`` entry); a reader takes the rows of the classes it needs,
whatever the number of processes that wrote them (:func:`write_class_shard`, :func:`read_class_rows`).
"""

from __future__ import annotations

import re
import secrets
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_info

from doppel.distributed import rank, world
from doppel.serialization import CheckpointError, CheckpointWriteError, atomic_save, load_checkpoint

STAMP = "doppel"
FORMAT = 1
CLASS_SHARDS = "class_shards"  # in a checkpoint: where the rows of its sharded classifier are
# In memory only, set by the callback that saves: the folder this save's processes write their rows to.
SHARD_REQUEST = "doppel_class_shard_folder"
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
        if not last.is_file():  # said plainly: a resume typed without its run folder starts afresh here
            rank_zero_info(f"ckpt_path=auto: {run_dir} has no checkpoint, so this is a new run; to resume an "
                           "earlier one, name its folder: hydra.run.dir=<that run's folder> ckpt_path=auto.")
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
        return read_checkpoint(resolve_ckpt_path(str(path), "."))


def read_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """:func:`load_checkpoint`, and where its class shards are (remembered in memory for
    :func:`read_class_rows`)."""
    checkpoint = load_checkpoint(path, key)
    manifest = checkpoint.get(CLASS_SHARDS)
    if isinstance(manifest, dict):
        manifest["read_from"] = f"{key}={str(path)!r}"
        manifest["root"] = str(Path(path).parent)
    return checkpoint


# -- class shards ------------------------------------------------------------------------------
# A row key names where a per-class tensor lives in a checkpoint: "state_dict/<parameter name>" or
# "optimizer/<optimizer>/<parameter index>/<state name>" (momentum, Adam's moments).
def _shard_file(rank_: int, world_size: int) -> str:
    return f"rank{rank_:05d}-of{world_size:05d}.pt"


def shard_folders(path: Path) -> Path:
    """Where the class shards of the checkpoint ``path`` go, one folder per save."""
    return path.parent / f"{path.name}.classes"


def new_shard_folder(path: Path, step: int) -> dict[str, str]:
    """A fresh folder for this save's class shards, the same on every process (collective when there are
    several): a save never writes into the folder the current checkpoint reads from."""
    token = [secrets.token_hex(4)]
    if world() > 1:
        torch.distributed.broadcast_object_list(token, src=0)
    folder = shard_folders(path) / f"step{step:09d}-{token[0]}"
    return {"root": str(path.parent), "folder": str(folder.relative_to(path.parent))}


def write_class_shard(checkpoint: dict[str, Any], request: Mapping[str, str], rows: Mapping[str, torch.Tensor],
                      bounds: list[int]) -> None:
    """Every process writes its class ``rows`` (row key -> rows [bounds[rank], bounds[rank + 1]) of a
    per-class tensor) to its file in the requested folder, and ``checkpoint`` gets the manifest in their
    place. Collective: if any process failed to write, or the first process cannot see every file (a run
    folder that is not shared by the nodes), every process raises :class:`CheckpointWriteError`."""
    folder = Path(request["root"]) / request["folder"]
    lo, hi = bounds[rank()], bounds[rank() + 1]
    failure = None
    try:
        atomic_save({"lo": lo, "hi": hi, "rows": dict(rows)}, folder / _shard_file(rank(), world()))
    except CheckpointWriteError as error:
        failure = f"process {rank()}: {error}"
    failures: list[str | None] = [failure] * world()
    if world() > 1:
        torch.distributed.all_gather_object(failures, failure)
    problem = [next((f for f in failures if f), None)]
    if problem[0] is None and rank() == 0:
        missing = [name for name in (_shard_file(r, world()) for r in range(world())) if not (folder / name).is_file()]
        if missing:
            problem[0] = (f"process 0 does not see {missing[0]} in {folder}, which another process wrote: the run "
                          "folder must be on a file system every node shares (hydra.run.dir=...), or set "
                          "checkpoint.class_shards=false to gather the classifier into process 0's file.")
    if world() > 1:
        torch.distributed.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise CheckpointWriteError(f"could not write the class shards of this checkpoint: {problem[0]}")
    for key in rows:
        _take(checkpoint, key)
    checkpoint[CLASS_SHARDS] = {"folder": request["folder"], "bounds": list(bounds),
                                "shapes": {key: [bounds[-1], *value.shape[1:]] for key, value in rows.items()}}


def read_class_rows(checkpoint: dict[str, Any], lo: int = 0, hi: int | None = None,
                    optimizer: bool = True) -> dict[str, Any]:
    """Puts the rows [lo, hi) (all by default) of every class tensor a checkpoint keeps in shard files back
    where they belong, reading only the files that hold them (memory-mapped: only those rows are paged in);
    ``optimizer=False``: the weights only, and the optimizer state is dropped. A checkpoint read with
    :func:`read_checkpoint` (it knows where its folder is). Returns ``checkpoint``."""
    manifest = checkpoint.pop(CLASS_SHARDS, None)
    if manifest is None:
        return checkpoint
    name = manifest.get("read_from", "the checkpoint")
    if "root" not in manifest:
        raise CheckpointError(f"{name}: its class shards cannot be found (read it with "
                              "doppel.checkpoint.read_checkpoint, which knows where it lies).")
    folder = Path(manifest["root"]) / manifest["folder"]
    bounds, shapes = manifest["bounds"], manifest["shapes"]
    hi = bounds[-1] if hi is None else hi
    wanted = [key for key in shapes if optimizer or key.startswith("state_dict/")]
    if not optimizer:
        checkpoint.pop("optimizer_states", None)
    if not folder.is_dir():
        raise CheckpointError(f"{name} keeps its classifier's rows in {folder}, which is missing: a checkpoint of a "
                              "sharded classifier is the file and that folder beside it; copy them together.")
    parts: dict[str, list[torch.Tensor]] = {key: [] for key in wanted}
    for index, (a, b) in enumerate(zip(bounds, bounds[1:])):
        if b <= lo or a >= hi:
            continue
        file = folder / _shard_file(index, len(bounds) - 1)
        shard = load_checkpoint(file, key=f"{name}'s class shard", mmap=True)
        rows = shard.get("rows")
        if (shard.get("lo"), shard.get("hi")) != (a, b) or not isinstance(rows, dict) or set(rows) != set(shapes):
            raise CheckpointError(f"{file} does not hold the rows {name} names (classes [{a}, {b}) of "
                                  f"{sorted(shapes)}): the folder was altered or mixed with another save's.")
        for key in wanted:
            parts[key].append(rows[key][max(lo, a) - a:min(hi, b) - a].clone())  # off the memory map
    for key, pieces in parts.items():
        tensor = torch.cat(pieces)
        if list(tensor.shape) != [hi - lo, *shapes[key][1:]]:
            raise CheckpointError(f"{folder}: {key} has rows of shape {list(tensor.shape[1:])}, the manifest of "
                                  f"{name} says {shapes[key][1:]}: the folder was altered.")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise CheckpointError(f"{name} has non-finite values in {key} (in {folder}): the run had diverged "
                                  "before it was saved (or the files were altered); use an earlier checkpoint.")
        put_rows(checkpoint, key, tensor)
    return checkpoint


def remove_stale_class_shards(path: Path, keep: Mapping[str, str] | None) -> None:
    """After a save to ``path``: the class shards of the checkpoints it replaced and of saves killed half-way,
    all but ``keep`` (this save's folder, if it wrote one)."""
    current = None if keep is None else Path(keep["root"]) / keep["folder"]
    if shard_folders(path).is_dir():
        for folder in shard_folders(path).iterdir():
            if folder != current:
                shutil.rmtree(folder, ignore_errors=True)


def _take(checkpoint: dict[str, Any], key: str) -> None:
    kind, *where = key.split("/")
    if kind == "state_dict":
        del checkpoint["state_dict"][where[0]]
    else:  # a new dict: the one in the checkpoint is the optimizer's live state
        states = checkpoint["optimizer_states"][int(where[0])]["state"]
        states[int(where[1])] = {k: v for k, v in states[int(where[1])].items() if k != where[2]}


def put_rows(checkpoint: dict[str, Any], key: str, tensor: torch.Tensor) -> None:
    """Sets the per-class tensor the row ``key`` names (see :func:`write_class_shard`)."""
    kind, *where = key.split("/")
    if kind == "state_dict":
        checkpoint["state_dict"][where[0]] = tensor
    else:  # a new dict: the one in the checkpoint may be the optimizer's live state
        states = checkpoint["optimizer_states"][int(where[0])]["state"]
        states[int(where[1])] = {**states[int(where[1])], where[2]: tensor}


def logical_shapes(checkpoint: Mapping[str, Any]) -> dict[str, list[int]]:
    """The shape of every tensor of the checkpoint's ``state_dict``, class shards included."""
    shapes = {key: list(tensor.shape) for key, tensor in checkpoint["state_dict"].items()}
    for key, shape in (checkpoint.get(CLASS_SHARDS) or {}).get("shapes", {}).items():
        if key.startswith("state_dict/"):
            shapes[key.removeprefix("state_dict/")] = list(shape)
    return shapes


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
    saved = logical_shapes(checkpoint)
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{name} does not fit the model this config builds: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}.")
    for key, tensor in expected.items():
        if tuple(saved[key]) != tuple(tensor.shape):
            raise CheckpointError(f"{name} does not fit the model this config builds: {key} is "
                                  f"{saved[key]} in the checkpoint and {list(tensor.shape)} here.")


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

