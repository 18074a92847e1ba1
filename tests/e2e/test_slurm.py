"""SLURM without a cluster: ``hydra/launcher=slurm`` composes submitit's launcher with Doppel's settings, and
SLURM's time-limit warning (SIGUSR1 / submitit's SIGUSR2) saves ``last.ckpt``, requeues the job through
``scontrol`` (a stand-in that records its arguments) and the requeued run resumes to the same bytes."""

import os
import signal
import stat

from hydra import compose, initialize_config_dir

from doppel.slurm import REQUEUE_SIGNALS, job_id
from doppel.train import CONFIG_DIR
from tests.conftest import TINY
from tests.e2e.cli import run_cli


def test_the_slurm_launcher_asks_for_the_warning_signal_and_requeues():
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout == 100
    assert launcher.additional_parameters.requeue is True


def test_both_warning_signals_requeue():
    assert set(REQUEUE_SIGNALS) == {signal.SIGUSR1, signal.SIGUSR2}


def test_an_array_task_is_requeued_by_its_array_id():
    assert job_id({"SLURM_JOB_ID": "77", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "3"}) == "70_3"
    assert job_id({"SLURM_JOB_ID": "77"}) == "77" and job_id({}) is None


def test_the_time_limit_warning_saves_requeues_and_the_requeued_job_resumes_exactly(tmp_path):
    signum = "SIGUSR2"  # submitit's; SIGUSR1 (sbatch --signal=USR1@90) takes the same path
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    args = [*TINY, "checkpoint.every_n_steps=null", "~callbacks.diagnostics"]
    whole = run_cli([*args, f"hydra.run.dir={tmp_path}/whole"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    warned = run_cli([*args, "+callbacks.fault._target_=tests.e2e.faults.SignalAtStep", "+callbacks.fault.step=8",
                      f"+callbacks.fault.signum={signum}", f"hydra.run.dir={tmp_path}/job", "ckpt_path=auto"],
                     cwd=tmp_path, env=env)
    assert warned.returncode == 128 + getattr(signal, signum), warned.stderr[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"
    assert "SLURM job 4242 requeued" in warned.stdout + warned.stderr
    requeued = run_cli([*args, f"hydra.run.dir={tmp_path}/job", "ckpt_path=auto"], cwd=tmp_path, env=env)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert (tmp_path / "job" / "metrics.json").read_bytes() == (tmp_path / "whole" / "metrics.json").read_bytes()
