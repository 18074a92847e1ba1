"""Partial FC through train.py on one process: ``classifier.sample_rate=0.3 classifier.negatives=doppel``
trains, mines and evaluates, and a run stopped mid-epoch resumes to the same bytes (the sampling generator
is saved with the other streams)."""

import json
import signal

from tests.conftest import TINY
from tests.e2e.cli import run_cli

PFC = ["classifier.sample_rate=0.3", "classifier.negatives=doppel", "checkpoint.every_n_steps=null",
       "~callbacks.diagnostics"]


def test_partial_fc_with_doppelganger_negatives_trains_and_resumes_exactly(tmp_path):
    whole = run_cli([*TINY, *PFC, f"hydra.run.dir={tmp_path}/whole"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    metrics = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert metrics["doppel/table_filled"] > 0.3 and metrics["test/novel/top1"] > 0
    fault = ["+callbacks.fault._target_=tests.e2e.faults.SignalAtStep", "+callbacks.fault.step=8",
             "+callbacks.fault.signum=SIGTERM"]
    stopped = run_cli([*TINY, *PFC, *fault, f"hydra.run.dir={tmp_path}/cut"], cwd=tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    resumed = run_cli([*TINY, *PFC, f"hydra.run.dir={tmp_path}/cut", "ckpt_path=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "cut" / "metrics.json").read_bytes() == (tmp_path / "whole" / "metrics.json").read_bytes()


def test_doppel_negatives_need_the_table_to_be_mined(tmp_path):
    result = run_cli([*TINY, "classifier.sample_rate=0.3", "classifier.negatives=doppel", "doppel.mine=false",
                      "sampler=random", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert result.returncode == 1
    assert "classifier.negatives=doppel draws the Partial FC negatives from the doppelganger table" in result.stderr
