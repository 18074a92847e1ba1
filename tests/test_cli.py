"""The scripts' errors: one sentence on stderr and exit 1, no traceback unless asked for; no empty run folder
left behind; an unknown key gets the keys that exist and a "did you mean"; a GPU asked for without one."""

import os

import pytest
import torch

from doppel.config import check_devices
from tests.e2e.cli import run_cli


def test_an_unknown_key_is_one_sentence_with_a_did_you_mean(tmp_path):
    result = run_cli(["optim.learning_rate=0.1"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: optim.learning_rate is not a setting (did you mean lr?); optim takes: decay_1d_params, lr, momentum, "
        "nesterov, weight_decay."]
    assert not any(tmp_path.rglob("*.log"))  # refused before Hydra made a run folder


def test_a_bad_value_ends_in_its_sentence_and_leaves_no_run_folder_unless_the_traceback_is_asked_for(tmp_path):
    result = run_cli(["optim.lr=-1", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == "Error: optim: Invalid learning rate: -1 (check the optim.* settings)."
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    assert not (tmp_path / "run").exists()
    asked = run_cli(["optim.lr=-1", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env={"DOPPEL_TRACEBACK": "1"})
    assert asked.returncode == 1 and "Traceback" in asked.stderr and "Invalid learning rate: -1" in asked.stderr


def test_a_gpu_asked_for_without_one_is_refused_and_too_many_cpu_processes_are_warned_about(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"trainer.accelerator=gpu needs a CUDA GPU and this machine has none"):
        check_devices("gpu", 1)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    with pytest.warns(UserWarning, match=r"trainer.devices=4 starts 4 processes on 2 CPU cores and no GPU"):
        check_devices("cpu", 4)
    with pytest.warns(UserWarning, match=r"trainer.devices=3 starts 3 processes on 2 CPU cores"):
        check_devices("auto", 3)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_devices("cpu", 2)
