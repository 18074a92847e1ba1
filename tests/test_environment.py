"""``speed.threads``: the count auto picks, what a run records, and that Lightning's DDP launch keeps it."""

from __future__ import annotations

import json
import os

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from doppel import environment
from doppel.environment import save_environment, thread_count, use_threads


@pytest.fixture
def no_omp(monkeypatch):
    monkeypatch.setattr(environment, "SHELL_OMP_NUM_THREADS", None)


@pytest.mark.parametrize(("cores", "devices", "expected"), [
    (2, "auto", 1), (2, 1, 1), (16, 1, 15), (16, 4, 3), (16, "4", 3), (2, 2, 1), (2, 4, 1), (8, [0, 1], 3)])
def test_auto_leaves_a_core_of_each_processs_share(monkeypatch, no_omp, cores, devices, expected):
    monkeypatch.setattr(environment, "cores_available", lambda: cores)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer = OmegaConf.create({"accelerator": "auto", "devices": devices})
    assert thread_count("auto", trainer)[0] == expected


def test_under_slurm_a_task_per_process_has_its_own_cores(monkeypatch, no_omp):
    """srun --ntasks-per-node=8 --cpus-per-task=10: each process sees its 10 cores, not a machine's."""
    monkeypatch.setattr(environment, "cores_available", lambda: 10)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    trainer = OmegaConf.create({"accelerator": "gpu", "devices": 8})
    for name in ("SLURM_PROCID", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(name, raising=False)
    assert thread_count("auto", trainer)[0] == 1  # without SLURM: 10 cores shared by 8 processes
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "8(x2)")
    assert thread_count("auto", trainer) == (9, "speed.threads=auto: 10 cores of this SLURM task, one core left "
                                                "to the data loader")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "1")  # one task that starts the 8 processes itself
    assert thread_count("auto", trainer)[0] == 1


def test_auto_counts_the_gpus_a_gpu_run_starts(monkeypatch, no_omp):
    monkeypatch.setattr(environment, "cores_available", lambda: 32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert thread_count("auto", OmegaConf.create({"accelerator": "gpu", "devices": "auto"}))[0] == 3
    assert thread_count("auto", OmegaConf.create({"accelerator": "cpu", "devices": "auto"}))[0] == 31


def test_a_number_or_the_shells_omp_num_threads_wins_and_a_bad_value_is_named(monkeypatch):
    trainer = OmegaConf.create({"devices": 1})
    assert thread_count(3, trainer) == (3, "speed.threads=3")
    monkeypatch.setattr(environment, "SHELL_OMP_NUM_THREADS", "5")
    assert thread_count("auto", trainer)[0] == 5
    # what Lightning's launch wrote into os.environ during an earlier job is not the user's setting
    monkeypatch.setattr(environment, "SHELL_OMP_NUM_THREADS", None)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    monkeypatch.setattr(environment, "cores_available", lambda: 2)
    assert thread_count("auto", trainer)[0] == 1
    for bad in (0, -1, "many", True, 1.5):
        with pytest.raises(ValueError, match=r"speed.threads=.* must be auto or a positive integer"):
            thread_count(bad, trainer)


def test_a_run_sets_and_records_its_threads(tmp_path, caplog, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # restored after the test
    try:
        cfg = OmegaConf.create({"speed": {"threads": 2}, "trainer": {"devices": 1}})
        with caplog.at_level("INFO"):
            assert use_threads(cfg) == 2 and torch.get_num_threads() == 2
        assert os.environ["OMP_NUM_THREADS"] == "2"  # the processes it starts (DDP's) inherit it
        assert f"torch {torch.__version__}, 2 thread(s) per process (speed.threads=2)" in caplog.text
        save_environment(tmp_path, 2)
        written = json.loads((tmp_path / "environment.json").read_text())
        assert written["threads"] == 2 and written["torch"] == torch.__version__
        assert written["cores"] == environment.cores_available() and written["cpu"] == environment.cpu_name()
    finally:
        torch.set_num_threads(before)


class _Recorder(pl.LightningModule):
    def __init__(self, folder):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.folder = folder

    def training_step(self, batch, batch_idx):
        (self.folder / f"rank{self.global_rank}").write_text(str(torch.get_num_threads()))
        return self.layer(batch[0]).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.ones(4, 2)), batch_size=2)


def test_lightnings_ddp_launch_keeps_the_runs_thread_count(tmp_path, monkeypatch):
    """Lightning's launcher sets each process to cores / processes threads (1 here with 2 processes on
    2 cores, or more on a bigger machine) unless OMP_NUM_THREADS is set: use_threads sets it, so every
    process runs with the run's count."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    wanted = environment.cores_available() // 2 + 1  # never Lightning's cores // 2
    try:
        use_threads(OmegaConf.create({"speed": {"threads": wanted}, "trainer": {"devices": 2}}))
        trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(_Recorder(tmp_path))
    finally:
        torch.set_num_threads(before)
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == [str(wanted)] * 2
