"""Host syncs per training step, counted on the CPU (doppel.host_syncs): none in a steady-state step.

A sync is a call that makes the host wait for a GPU: reading a value back, a result shaped by values, a
copy from pageable memory. Sync points come every trainer.log_every_n_steps steps (here set past the run,
so every step counted is a steady-state one)."""

import json

import pytest
import torch

from doppel.host_syncs import HostSyncCounter
from doppel.losses.exemplar import CosineMarginLoss
from doppel.sampling.doppelganger import DoppelgangerTable, Mining
from doppel.train import train
from tests.conftest import TINY, compose_cfg
from tests.e2e.cli import run_cli
from tests.e2e.test_sharded_ddp import DDP, SHORT

COUNT = ["trainer.log_every_n_steps=1000", "+callbacks.syncs._target_=doppel.callbacks.host_sync_count.CountHostSyncs"]


def test_the_counter_sees_each_kind_of_sync_made_by_doppels_code_only():
    labels = torch.tensor([0, 0, 1, 1, 2])
    with HostSyncCounter() as syncs:
        DoppelgangerTable(5).filled_fraction()  # .item()
    assert syncs.total == 1 and "item at doppel/sampling/doppelganger.py" in next(iter(syncs.sites))
    with HostSyncCounter() as syncs:
        Mining(1, "mean").propose(torch.randn(5, 3), labels)  # unique(): a class's mean gathers its rows
    assert [site.split()[0] for site in syncs.sites] == ["unique"]
    with HostSyncCounter() as syncs:
        CosineMarginLoss().sample_pairs(torch.zeros(5, 5), labels)  # three boolean masks
    assert syncs.total == 3 and all(site.startswith("__getitem__") for site in syncs.sites)
    with HostSyncCounter() as syncs:
        DoppelgangerTable(5).to_("cpu")  # a device transfer asked for directly
    assert [site.split()[0] for site in syncs.sites] == ["to"]
    with HostSyncCounter() as syncs:
        torch.ones(3).sum().item()  # not doppel's code: not counted
        DoppelgangerTable(5).table.to(torch.float32)  # not a transfer
    assert syncs.total == 0


def read_counts(folder, ranks=1):
    return [json.loads((folder / f"host_syncs_rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.parametrize("overrides", [[], ["classifier.sample_rate=0.5", "classifier.negatives=doppel"]],
                         ids=["default", "partial_fc_doppel"])
def test_a_training_step_makes_no_host_sync(tmp_path, overrides):
    """The default run (doppelganger sampler, mining, L2-Softmax + margin loss with its pair sampling,
    augmentation, exposure counts, checkpoint callback) and Partial FC with doppelganger negatives."""
    train(compose_cfg(tmp_path, [*COUNT, f"+callbacks.syncs.folder={tmp_path}", "trainer.max_epochs=1",
                                 *overrides]))
    [counts] = read_counts(tmp_path)
    assert len(counts["per_step"]) == 6
    assert counts["per_step"] == [0] * 6, counts["sites"]


def test_a_sharded_step_in_two_processes_makes_no_host_sync(tmp_path):
    """The class-sharded classifier (gathered rows, distributed cross-entropy), Partial FC with doppelganger
    negatives on the shards and the all-gathered mining proposals: every step of both processes."""
    run = tmp_path / "run"
    result = run_cli([*TINY, *DDP, *SHORT, *COUNT, f"+callbacks.syncs.folder={run}", "classifier.sharded=true",
                      "classifier.sample_rate=0.5", "classifier.negatives=doppel", "~callbacks.diagnostics",
                      f"hydra.run.dir={run}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["doppel/table_filled"] > 0.3  # the tables of the two processes agreed at every epoch end
    for counts in read_counts(run, 2):
        assert counts["per_step"] and counts["per_step"] == [0] * len(counts["per_step"]), counts["sites"]
