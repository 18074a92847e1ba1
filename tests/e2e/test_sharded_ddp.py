"""``classifier.sharded=true`` through train.py in two processes (DDP on CPU, gloo): the run trains and
evaluates as the unsharded one does, its table is the one a single process mines from the whole logits of
the same global batches, its checkpoint holds one logical classifier, and a stopped run resumes exactly."""

import json
import signal

import pytest
import torch

from doppel.checkpoint import read_checkpoint, read_class_rows
from doppel.sampling.doppelganger import DoppelgangerTable
from tests.conftest import TINY
from tests.e2e.cli import run_cli

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"]
SHORT = ["trainer.max_epochs=2", "trainer.limit_train_batches=2", "doppel.top_k=2"]
RECORD = "+callbacks.recorder._target_=tests.e2e.recorder.MiningRecorder"


def whole(run):
    """The run's last.ckpt with its class shards read back in: one logical checkpoint."""
    return read_class_rows(read_checkpoint(run / "checkpoints" / "last.ckpt"))


def test_a_sharded_run_mines_the_unsharded_table_checkpoints_one_classifier_and_resumes_exactly(tmp_path):
    """Sharded against unsharded (2 processes each): the same table, which is also the one a single process
    mines from the whole logits of the same global batches, and the same metrics; the sharded checkpoint holds
    the whole classifier and its momentum; stopped at step 3 and resumed, the run ends with the same bytes."""
    args = [*TINY, *DDP, *SHORT, "checkpoint.every_n_steps=null", "~callbacks.diagnostics"]
    runs = {}
    for name, sharded in (("sharded", "true"), ("whole", "false")):
        run = tmp_path / name
        result = run_cli([*args, f"classifier.sharded={sharded}", RECORD, f"+callbacks.recorder.folder={run}",
                          f"hydra.run.dir={run}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = run
    tables = {name: [torch.load(run / f"table_rank{r}.pt", weights_only=True) for r in (0, 1)]
              for name, run in runs.items()}
    assert torch.equal(tables["sharded"][0], tables["sharded"][1])
    assert torch.equal(tables["sharded"][0], tables["whole"][0])
    # One process mining the whole logits of each global batch (gathered from the shards' columns)
    steps = torch.load(runs["sharded"] / "global_batches.pt", weights_only=True)
    classes = tables["sharded"][0].shape[0]
    assert len(steps) == 4 and steps[0]["logits"].shape == (48, classes)  # 2 processes x 24 rows, every class
    one = DoppelgangerTable(classes, top_k=2)
    for step in steps:
        one.apply(one.propose(step["logits"], step["labels"]))
    assert torch.equal(one.table, tables["sharded"][0])
    assert (one.table >= 0).float().mean() > 0.3
    # The same weights up to the order of float sums, which 4 steps grow to ~1e-3 of a tensor's norm (a pair
    # of the margin loss drawn on either side of a float boundary), and metrics up to the decisions that can
    # flip (a nearest neighbour within float error: one query of the 312 is 0.0032).
    weights = {name: whole(run)["state_dict"] for name, run in runs.items()}
    assert weights["sharded"].keys() == weights["whole"].keys()
    for key, tensor in weights["whole"].items():
        if tensor.is_floating_point():
            assert (weights["sharded"][key] - tensor).norm() <= 1e-2 * tensor.norm() + 1e-6, key
    metrics = {name: json.loads((run / "metrics.json").read_text()) for name, run in runs.items()}
    assert metrics["sharded"].keys() == metrics["whole"].keys()
    for key, value in metrics["whole"].items():
        assert metrics["sharded"][key] == pytest.approx(value, abs=0.02), key
    # eval.py and init_from read the per-process files of the sharded checkpoint as one classifier: scored
    # on one process it gives the run's final numbers; a run started from it holds its classifier.
    from doppel.evaluate import evaluate
    from doppel.train import train
    from tests.conftest import compose_cfg

    last = runs["sharded"] / "checkpoints" / "last.ckpt"
    again = evaluate(compose_cfg(tmp_path / "again", [f"ckpt_path={last}"]), overrides=[f"ckpt_path={last}"])
    assert again == pytest.approx({k: v for k, v in metrics["sharded"].items() if k.startswith("test/")}, abs=1e-6)
    train(compose_cfg(tmp_path / "start", ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "optim.lr=0",
                                           "optim.weight_decay=0", f"init_from={last}"]))
    started = whole(tmp_path / "start")["state_dict"]
    for key in ("loss_set.terms.l2s.classifier.weight", "loss_set.terms.l2s.classifier.bias"):
        assert torch.equal(started[key], weights["sharded"][key]), key

    sharded = [*args, "classifier.sharded=true"]
    fault = ["+callbacks.fault._target_=tests.e2e.faults.SignalAtStep", "+callbacks.fault.step=3",
             "+callbacks.fault.signum=SIGTERM"]
    stopped = run_cli([*sharded, *fault, f"hydra.run.dir={tmp_path}/cut"], cwd=tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    # Each process wrote its own rows (weights, bias, momentum) to its file; the checkpoint holds none of them.
    plain = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    assert "loss_set.terms.l2s.classifier.weight" not in plain["state_dict"]
    shards = sorted((tmp_path / "cut" / "checkpoints").glob("last.ckpt.classes/*/*.pt"))
    assert [p.name for p in shards] == ["rank00000-of00002.pt", "rank00001-of00002.pt"]
    assert shards[0].parent.name == plain["class_shards"]["folder"].split("/")[-1]
    rows = [torch.load(p, weights_only=True) for p in shards]
    assert [(r["lo"], r["hi"]) for r in rows] == [(0, (classes + 1) // 2), ((classes + 1) // 2, classes)]
    checkpoint = whole(tmp_path / "cut")
    assert torch.equal(checkpoint["state_dict"]["loss_set.terms.l2s.classifier.weight"],
                       torch.cat([r["rows"]["state_dict/loss_set.terms.l2s.classifier.weight"] for r in rows]))
    weight = checkpoint["state_dict"]["loss_set.terms.l2s.classifier.weight"]
    bias = checkpoint["state_dict"]["loss_set.terms.l2s.classifier.bias"]
    assert weight.shape == (classes, 16) and bias.shape == (classes,)
    momenta = [s["momentum_buffer"] for s in checkpoint["optimizer_states"][0]["state"].values()]
    assert sum(m.shape == (classes, 16) for m in momenta) == 1  # the classifier's momentum, whole as well
    # Resumed with checkpoint.class_shards=false: its saves gather the classifier into process 0's file, and
    # the stopped run's folder of shards goes once the first of them is in place.
    resumed = run_cli([*sharded, f"hydra.run.dir={tmp_path}/cut", "ckpt_path=auto", "checkpoint.class_shards=false"],
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "cut" / "metrics.json").read_bytes() == (runs["sharded"] / "metrics.json").read_bytes()
    final = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    reference = whole(runs["sharded"])
    assert "class_shards" not in final
    assert final["state_dict"]["loss_set.terms.l2s.classifier.weight"].shape[0] == classes
    assert list((tmp_path / "cut" / "checkpoints" / "last.ckpt.classes").iterdir()) == []
    for key, tensor in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][key], tensor), key


@pytest.mark.parametrize("loss, what", [("ie", "the loss term IELoss cannot be split"),
                                        ("contrastive", "the loss has no classifier term")])
def test_sharding_a_loss_without_a_softmax_weight_matrix_is_refused(tmp_path, loss, what):
    overrides = ["~loss.terms.softmax"] if loss == "ie" else []  # IE alone: its centres are the classifier
    result = run_cli([*TINY, f"loss={loss}", *overrides, "classifier.sharded=true", f"hydra.run.dir={tmp_path}/run"],
                     cwd=tmp_path)
    assert result.returncode == 1
    assert f"classifier.sharded=true: {what}" in result.stderr


def test_a_sharded_run_resumes_on_three_then_two_then_one_processes_with_its_logical_state(tmp_path):
    """3 processes x 16 images are stopped at step 2 (mid-epoch), resumed on 2 x 24 and stopped at step 4,
    resumed on 1 x 48 to the end: each resumed run starts from the saved logical classifier, its momentum and
    the table, resharded for its process count (each process reads its rows from the files of the processes
    that held them); the global batch and so the schedule are kept."""
    folder = tmp_path / "run"
    base = [*TINY, "classifier.sharded=true", "trainer.accelerator=cpu", "trainer.strategy=ddp",
            "trainer.max_epochs=2", "trainer.limit_train_batches=3", "checkpoint.every_n_steps=null",
            "~callbacks.diagnostics", "+callbacks.state._target_=tests.e2e.recorder.LogicalStateRecorder",
            f"+callbacks.state.folder={folder}", f"hydra.run.dir={folder}"]
    stop = ["+callbacks.fault._target_=tests.e2e.faults.SignalAtStep", "+callbacks.fault.signum=SIGTERM"]
    saved = []
    for world, batch, step in ((3, 16, 2), (2, 24, 4), (1, 48, None)):
        args = [*base, f"trainer.devices={world}", f"sampler.batch_size={batch}"]
        args += [*stop, f"+callbacks.fault.step={step}"] if step else []
        args += ["ckpt_path=auto"] if saved else []
        result = run_cli(args, cwd=tmp_path)
        assert result.returncode == (128 + signal.SIGTERM if step else 0), result.stderr[-3000:]
        if saved:
            assert f"resuming a run of {world + 1} processes on {world}" in result.stderr
            start = torch.load(folder / f"start_w{world}.pt", weights_only=True)
            assert start["step"] == saved[-1]["global_step"]
            assert torch.equal(start["table"], saved[-1]["callbacks"]["DoppelgangerMining"]["table"])
            for key, tensor in saved[-1]["state_dict"].items():
                assert torch.equal(start["state_dict"][key], tensor), key
            momenta = {i: s["momentum_buffer"] for i, s in saved[-1]["optimizer_states"][0]["state"].items()}
            assert start["momentum"].keys() == momenta.keys()
            assert any(m.shape[0] == saved[-1]["doppel"]["classes"] for m in momenta.values())
            for index, tensor in momenta.items():
                assert torch.equal(start["momentum"][index], tensor), index
        if step:
            saved.append(whole(folder))
    assert json.loads((folder / "metrics.json").read_text())["doppel/table_filled"] > 0.3
    assert saved[0]["state_dict"]["loss_set.terms.l2s.classifier.weight"].shape[0] == saved[0]["doppel"]["classes"]


def test_sharded_on_one_process_is_the_plain_run(tmp_path):
    """One process holds every class: its deferred rows are drawn whole at setup, the same run to the bit."""
    from doppel.train import train
    from tests.conftest import compose_cfg

    short = ["trainer.max_epochs=1", "trainer.limit_train_batches=3"]
    sharded = train(compose_cfg(tmp_path / "sharded", [*short, "classifier.sharded=true"]))
    plain = train(compose_cfg(tmp_path / "plain", short))
    assert dict(sharded) == dict(plain)
