"""Two processes (DDP on CPU, gloo): one table, the one a single process mines from the same global
batches; and a stopped run resumes exactly, each process with its own streams."""

import json
import signal

import torch

from doppel.sampling.doppelganger import DoppelgangerTable
from tests.conftest import TINY
from tests.e2e.cli import run_cli

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]


def test_two_processes_mine_the_table_one_process_mines_from_their_global_batches(tmp_path):
    run = tmp_path / "run"
    result = run_cli([*TINY, *DDP, "doppel.top_k=3", "trainer.max_epochs=2", "trainer.limit_train_batches=4",
                      "+callbacks.recorder._target_=tests.e2e.recorder.MiningRecorder",
                      f"+callbacks.recorder.folder={run}", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tables = [torch.load(run / f"table_rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert torch.equal(tables[0], tables[1])
    steps = torch.load(run / "global_batches.pt", weights_only=True)
    assert len(steps) == 8 and len(steps[0]["labels"]) == 48  # 2 processes x 24
    one = DoppelgangerTable(tables[0].shape[0], top_k=3)
    repeated = 0
    for step in steps:
        one.apply(one.propose(step["logits"], step["labels"]))
        first, second = step["labels"][:24].unique(), step["labels"][24:].unique()
        repeated += len(set(first.tolist()) & set(second.tolist()))
    assert repeated > 0  # classes in both processes' batches: where merging matters
    assert torch.equal(tables[0], one.table)
    assert (one.table >= 0).float().mean() > 0.2


def test_a_two_process_run_stopped_by_sigterm_resumes_to_byte_identical_metrics(tmp_path):
    args = [*TINY, *DDP, "trainer.max_epochs=2", "trainer.limit_train_batches=4", "checkpoint.every_n_steps=null"]
    whole = run_cli([*args, f"hydra.run.dir={tmp_path}/whole"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    # SIGTERM reaches the first process only, mid-epoch: both stop after that step and save
    fault = ["+callbacks.fault._target_=tests.e2e.faults.SignalAtStep", "+callbacks.fault.step=6",
             "+callbacks.fault.signum=SIGTERM"]
    stopped = run_cli([*args, *fault, f"hydra.run.dir={tmp_path}/cut"], cwd=tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6 and len(checkpoint["doppel"]["processes"]) == 2
    resumed = run_cli([*args, f"hydra.run.dir={tmp_path}/cut", "ckpt_path=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "cut" / "metrics.json").read_bytes() == (tmp_path / "whole" / "metrics.json").read_bytes()
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["doppel/table_filled"] > 0

    one_process = run_cli([*TINY, "trainer.max_epochs=2", "trainer.limit_train_batches=4",
                           f"hydra.run.dir={tmp_path}/cut", "ckpt_path=auto"], cwd=tmp_path)
    assert one_process.returncode == 1
    assert "written by 2 processes and this run has 1" in one_process.stderr


def test_mean_reduction_is_refused_across_processes(tmp_path):
    result = run_cli([*TINY, *DDP, "doppel.reduction=mean", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}/run"],
                     cwd=tmp_path)
    assert result.returncode == 1
    assert ("doppel.reduction='mean' cannot be mined exactly by 2 processes (a class's mean needs all its logits "
            "in one place): use doppel.reduction=max or one process.") in result.stderr
