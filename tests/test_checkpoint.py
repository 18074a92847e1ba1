"""Checkpoint files: atomic writes, safe reads with clear errors, ckpt_path resolution, fitness checks."""

import os
import pickle
import re
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from doppel.checkpoint import (
    FORMAT,
    STAMP,
    SafeCheckpointIO,
    check_checkpoint,
    check_state_dict,
    config_differences,
    resolve_ckpt_path,
)
from doppel.serialization import CheckpointError, atomic_save, load_checkpoint

KILL_MIDWAY = """
import os, signal, sys, torch
sys.path.insert(0, {src!r})
from doppel.serialization import atomic_save

real_save = torch.save
def half_then_die(obj, f):  # write half of the bytes, then the process is killed
    import io
    buffer = io.BytesIO(); real_save(obj, buffer); data = buffer.getvalue()
    f.write(data[: len(data) // 2]); f.flush(); os.kill(os.getpid(), signal.SIGKILL)
torch.save = half_then_die
atomic_save({{"step": torch.tensor(2), "weights": torch.ones(100_000)}}, {path!r})
"""


def test_a_writer_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_save({"step": torch.tensor(1), "weights": torch.zeros(100_000)}, path)
    src = str(Path(__file__).resolve().parents[1] / "src")
    result = subprocess.run([sys.executable, "-c", KILL_MIDWAY.format(src=src, path=str(path))])
    assert result.returncode == -signal.SIGKILL
    assert load_checkpoint(path)["step"] == 1  # the old file, whole
    leftovers = list(tmp_path.glob(".last.ckpt.*.tmp"))
    assert len(leftovers) == 1 and 0 < leftovers[0].stat().st_size
    atomic_save({"step": torch.tensor(3)}, path)
    assert load_checkpoint(path)["step"] == 3 and not list(tmp_path.glob(".last.ckpt.*.tmp"))


def test_a_written_checkpoint_has_the_modes_of_any_new_file(tmp_path):
    previous = os.umask(0o027)
    try:
        atomic_save({"a": 1}, tmp_path / "x.ckpt")
    finally:
        os.umask(previous)
    assert (tmp_path / "x.ckpt").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (pickle.dumps({"state_dict": {}}), "is a plain Python pickle, not a torch.save checkpoint: refused unread"),
    (b"\x00" * 64, "is not a PyTorch checkpoint"),
])
def test_unreadable_files_get_one_sentence(tmp_path, content, message):
    path = tmp_path / "bad.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_truncated_whole_model_and_non_dict_files(tmp_path):
    atomic_save({"w": torch.ones(1000)}, tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"is truncated or corrupt \(PytorchStreamReader failed"):
        load_checkpoint(tmp_path / "cut.ckpt")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.ckpt")  # a whole pickled model
    with pytest.raises(CheckpointError, match="would call torch.nn.modules.linear.Linear"):
        load_checkpoint(tmp_path / "model.ckpt", key="backbone.checkpoint")
    torch.save([1, 2], tmp_path / "list.ckpt")
    with pytest.raises(CheckpointError, match="holds a list, not a training checkpoint"):
        load_checkpoint(tmp_path / "list.ckpt")


def test_ckpt_path_values(tmp_path):
    assert resolve_ckpt_path(None, tmp_path) is None
    assert resolve_ckpt_path("auto", tmp_path) is None  # nothing saved yet: a new run
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("auto", tmp_path) == tmp_path / "checkpoints" / "last.ckpt"
    assert resolve_ckpt_path(f"file://{tmp_path}/checkpoints/last.ckpt", ".") == tmp_path / "checkpoints" / "last.ckpt"
    for remote in ("https://example.org/a.ckpt", "s3://bucket/a.ckpt", "hf://user/model"):
        with pytest.raises(CheckpointError, match="remote address"):
            resolve_ckpt_path(remote, tmp_path)
    with pytest.raises(FileNotFoundError, match="ckpt_path='nope.ckpt' does not exist"):
        resolve_ckpt_path("nope.ckpt", tmp_path)


CONFIG = {"seed": 0, "backbone": {"embedding_dim": 16}, "optim": {"lr": 0.01}, "paths": {"output_dir": "/a"},
          "loss": {"terms": {"mb": {"seed": 0, "alpha": 0.1}}}, "data": {"path": None, "eval_batch_size": 512}}


def stamped(config=CONFIG, **tensors):
    return {STAMP: {"format": FORMAT, "config": config}, "state_dict": tensors or {"w": torch.ones(2)}}


def test_only_the_run_that_wrote_a_checkpoint_resumes_it():
    with pytest.raises(CheckpointError, match="was not written by a Doppel run"):
        check_checkpoint({"state_dict": {}}, CONFIG, "x")
    with pytest.raises(CheckpointError, match="has checkpoint format 0"):
        check_checkpoint({STAMP: {"format": 0}, "state_dict": {}}, CONFIG, "x")
    other = {**CONFIG, "backbone": {"embedding_dim": 32}}
    with pytest.raises(CheckpointError, match=r"was made by another run \(backbone.embedding_dim: 16 -> 32\)"):
        check_checkpoint(stamped(), other, "x")
    # a loss hyper-parameter decides what the weights mean as much as the backbone does
    other = {**CONFIG, "loss": {"terms": {"mb": {"seed": 0, "alpha": 0.2}}}}
    with pytest.raises(CheckpointError, match=r"was made by another run \(loss.terms.mb.alpha: 0.1 -> 0.2\)"):
        check_checkpoint(stamped(), other, "x")
    # run-local settings are no difference (the data copied to another node's disk); others warn
    local = {**CONFIG, "paths": {"output_dir": "/b"},
             "data": {**CONFIG["data"], "root": "/scratch/job2/faces", "eval_batch_size": 64, "num_workers": 2}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_checkpoint(stamped(), local, "x")
    with pytest.warns(UserWarning, match=r"changed settings \(loss.terms.mb.seed: 0 -> 1, optim.lr: 0.01 -> 0.1, "
                                         r"seed: 0 -> 1\)"):
        check_checkpoint(stamped(), {**CONFIG, "seed": 1, "optim": {"lr": 0.1},
                                     "loss": {"terms": {"mb": {"seed": 1, "alpha": 0.1}}}}, "x")


def test_non_finite_values_are_named():
    with pytest.raises(CheckpointError, match="has 1 non-finite values in state_dict.head.w"):
        check_checkpoint(stamped(**{"head.w": torch.tensor([1.0, float("nan")])}), CONFIG, "x")
    momentum = {"state": {0: {"momentum_buffer": torch.tensor([float("inf")])}}}
    bad_momentum = {**stamped(), "optimizer_states": [momentum]}
    with pytest.raises(CheckpointError, match=r"optimizer_states\[0\].state.0.momentum_buffer"):
        check_checkpoint(bad_momentum, CONFIG, "x")


def test_state_dict_must_fit_the_built_model():
    expected = {"fc.weight": torch.zeros(16, 4), "fc.bias": torch.zeros(16)}
    check_state_dict({"state_dict": {k: v.clone() for k, v in expected.items()}}, expected, "x")
    with pytest.raises(CheckpointError, match=r"fc.weight is \[32, 4\] in the checkpoint and \[16, 4\] here"):
        check_state_dict({"state_dict": {"fc.weight": torch.zeros(32, 4), "fc.bias": torch.zeros(16)}}, expected, "x")
    with pytest.raises(CheckpointError, match=r"missing \['fc.bias'\], unexpected \['fc.b'\]"):
        check_state_dict({"state_dict": {"fc.weight": torch.zeros(16, 4), "fc.b": torch.zeros(16)}}, expected, "x")


def test_config_differences_list_added_and_removed_keys():
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 1, "c": 2}})[0][0] == "a.c"
    assert config_differences({"a": {"b": [1, 2]}}, {"a": {"b": [1, 3]}}) == [("a.b", [1, 2], [1, 3])]


def test_safe_io_hands_over_a_preloaded_checkpoint_once_then_reads_files(tmp_path):
    path = tmp_path / "a.ckpt"
    atomic_save({"step": 2}, path)
    io = SafeCheckpointIO((path, {"step": 1}))
    assert io.load_checkpoint(path) == {"step": 1}
    assert io.load_checkpoint(path) == {"step": 2}
    io.save_checkpoint({"step": 5}, tmp_path / "sub" / "b.ckpt")
    assert load_checkpoint(tmp_path / "sub" / "b.ckpt") == {"step": 5}


def test_a_checkpoint_folder_that_cannot_take_a_checkpoint_is_named_before_training(tmp_path, monkeypatch):
    """Checked when the run starts: the space for a checkpoint beside the previous one, and ulimit -f."""
    import shutil
    import subprocess
    import sys
    from collections import namedtuple

    from doppel.serialization import CheckpointWriteError
    from doppel.train import train
    from tests.conftest import TINY, compose_cfg

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(CheckpointWriteError, match=r"checkpoints has 4096 bytes free; a checkpoint of this run needs "
                                                   r"about \d+ \(the new file beside the previous one\)"):
        train(compose_cfg(tmp_path / "full", ["trainer.max_epochs=1"]))
    assert not (tmp_path / "full" / "checkpoints" / "last.ckpt").exists()
    monkeypatch.undo()
    args = " ".join([*TINY, "trainer.max_epochs=1", "report=false", "~callbacks.diagnostics",
                     f"hydra.run.dir={tmp_path / 'limited'}"])
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(["bash", "-c", f"ulimit -f 300; {sys.executable} {root / 'train.py'} {args}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert re.search(r"this process may write files of at most 307200 bytes \(ulimit -f\): raise the limit",
                     result.stderr), result.stderr[-2000:]


def test_a_save_that_fails_mid_run_names_the_file_and_cause_and_the_intact_previous_checkpoint(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    import doppel.serialization as serialization
    from doppel.serialization import CheckpointWriteError
    from doppel.train import train
    from tests.conftest import compose_cfg

    real_save, real_usage, calls = torch.save, shutil.disk_usage, []
    usage = namedtuple("usage", "total used free")

    def save(checkpoint, file):
        calls.append(1)
        if len(calls) == 2:  # the second save: the disk fills up while torch writes
            monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**9, 10**9, 0))
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
        real_save(checkpoint, file)

    monkeypatch.setattr(serialization.torch, "save", save)
    path = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointWriteError, match=rf"could not write {re.escape(str(path))}: the disk is full \(0 "
                                                   rf"bytes free\)\. The previous {re.escape(str(path))} \(step 2\) "
                                                   "is intact: fix the cause and resume from it with ckpt_path=auto"):
        train(compose_cfg(tmp_path, ["trainer.max_epochs=1", "checkpoint.every_n_steps=2"]))
    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    assert load_checkpoint(path)["global_step"] == 2 and not list(path.parent.glob(".*.tmp"))
