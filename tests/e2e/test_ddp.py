"""Two processes (DDP on CPU, gloo): one table, the one a single process mines from the same global
batches; and a stopped run resumes exactly, each process with its own streams."""

import json
import math
import signal

import torch

from doppel.sampling.doppelganger import DoppelgangerTable
from doppel.sampling.samplers import DoppelgangerBatchSampler, SamplerContext
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
    # One process resumes it too (the same planned steps: limit_train_batches fixes the epoch's length), with
    # the warning that its streams start anew
    assert one_process.returncode == 0, one_process.stderr[-3000:]
    assert "resuming a run of 2 processes on 1" in one_process.stderr


def test_mean_reduction_is_refused_across_processes(tmp_path):
    result = run_cli([*TINY, *DDP, "doppel.reduction=mean", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}/run"],
                     cwd=tmp_path)
    assert result.returncode == 1
    assert ("doppel.reduction='mean' cannot be mined exactly by 2 processes (a class's mean needs all its logits "
            "in one place): use doppel.reduction=max, classifier.sharded=true or one process.") in result.stderr


def test_two_processes_split_each_global_batch_and_draw_their_own_augmentation(tmp_path):
    """One epoch of 2 processes draws the images of one epoch in total (not one per process); process r's
    batch at step s is sub-batch 2s + r of the stream one process draws with the same tables, so each
    doppelganger chain stays in one process; augmentation and pair sampling differ between processes."""
    run = tmp_path / "run"
    result = run_cli([*TINY, *DDP, "trainer.max_epochs=1", "trainer.limit_train_batches=1.0",
                      "+callbacks.recorder._target_=tests.e2e.recorder.ParallelRecorder",
                      f"+callbacks.recorder.folder={run}", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(run / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    labels = ranks[0]["training_labels"]
    steps = len(ranks[0]["steps"])
    assert steps == len(ranks[1]["steps"]) == math.ceil(len(labels) / (2 * 24))  # the documented epoch
    assert sum(len(s["indices"]) for r in ranks for s in r["steps"]) == steps * 2 * 24
    for rank in ranks:
        for step in rank["steps"]:
            assert torch.equal(labels[step["indices"]], step["labels"])
    assert all(a["indices"] != b["indices"] for a, b in zip(ranks[0]["steps"], ranks[1]["steps"]))

    # Replay: one process's doppel sampler, its table set to each step's, draws both processes' batches.
    table = DoppelgangerTable(int(labels.max()) + 1)
    replay = iter(DoppelgangerBatchSampler(SamplerContext(labels, seed=0, table=table), 24,
                                           examples_per_class=[2, 4], batches_per_epoch=2 * steps))
    for s in range(steps):
        assert torch.equal(ranks[0]["steps"][s]["table"], ranks[1]["steps"][s]["table"])
        table.table.copy_(ranks[0]["steps"][s]["table"])
        assert [next(replay), next(replay)] == [ranks[0]["steps"][s]["indices"], ranks[1]["steps"][s]["indices"]]
    assert any((step["table"] >= 0).any() for step in ranks[0]["steps"][1:])  # chains were drawn from the table

    generators = [r["generators"] for r in ranks]
    assert generators[0].keys() == generators[1].keys() and len(generators[0]) >= 2  # augmentation, pair sampling
    for name in generators[0]:
        assert not torch.equal(generators[0][name], generators[1][name])
    assert torch.equal(generators[0]["augment.generator"], torch.Generator().manual_seed(0).get_state())


def test_two_processes_evaluate_what_one_process_computes_from_the_same_weights(tmp_path):
    """Each process embeds every other image of each set; gathered and scored once, the numbers equal
    those of one process scoring the same checkpoint with eval.py (the whole sets in one process)."""
    evaluate = ["eval=[prototype,retrieval]", "eval.retrieval.ks=[1,2,4]", "data.eval_batch_size=7"]
    args = [*TINY, "trainer.max_epochs=1", "trainer.limit_train_batches=3", *evaluate]
    two = run_cli([*args, *DDP, f"hydra.run.dir={tmp_path}/two"], cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    distributed = json.loads((tmp_path / "two" / "metrics.json").read_text())
    checkpoint = tmp_path / "two" / "checkpoints" / "last.ckpt"
    one = run_cli([f"ckpt_path={checkpoint}", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                   f"hydra.run.dir={tmp_path}/one"], cwd=tmp_path, script="eval.py")
    assert one.returncode == 0, one.stderr[-3000:]
    single = json.loads((tmp_path / "one" / "metrics.json").read_text())
    tested = {k: v for k, v in distributed.items() if k.startswith("test/")}
    assert tested == single  # same keys, same values (the checkpoint's data and protocols)
    assert {"test/retrieval/recall@4", "test/retrieval/nmi", "test/novel/top1"} <= single.keys()
    assert "[retrieval]" in one.stdout and "recall@4" in one.stdout
