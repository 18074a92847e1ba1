"""Whole runs on a tiny subset of the bundled data (seconds each)."""

import json
from pathlib import Path

import pytest
import torch

from doppel.evaluation.prototype import PrototypeProtocol
from doppel.train import train
from tests.conftest import TINY, compose_cfg, write_emoji_npz
from tests.e2e.cli import run_cli
from tests.e2e.reference import assert_metrics_are_the_reference

ROOT = Path(__file__).resolve().parents[2]


def test_default_run_trains_mines_and_evaluates(tmp_path):
    cfg = compose_cfg(tmp_path)
    assert cfg.loss.terms.keys() == {"l2s", "mb"} and cfg.sampler._target_.endswith("auto_sampler")
    from doppel.config import resolve_mining

    assert resolve_mining(cfg, has_prototype=True)[1]._target_.endswith(".DoppelgangerBatchSampler")
    metrics = train(cfg)
    assert_metrics_are_the_reference(tmp_path, cfg, metrics)
    expected = [f"test/{name}" for name in PrototypeProtocol().metric_names()] + ["train/epochs",
                                                                                  "doppel/table_filled"]
    assert sorted(metrics) == sorted(expected) and metrics.objective == "test/novel/coverage@0.99"
    assert (tmp_path / "precision_coverage.png").stat().st_size > 0
    assert metrics["doppel/table_filled"] > 0.3  # 12 steps of ~8 classes over ~90 classes
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    assert (tmp_path / "config.yaml").exists()
    log = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for column in ("train/loss/l2s", "train/loss/mb", "train/l2s/scale", "train/mb/beta",
                   "doppel/table_filled", "doppel/churn", "doppel/from_table", "val/novel/coverage@0.99"):
        assert column in log, column


def test_training_improves_over_the_untrained_network(tmp_path):
    # A learnable file in the bundled format: each identity is a coarse colour pattern under noise.
    path = write_emoji_npz(tmp_path / "learnable.npz", n_families=30)
    common = ["data=emoji", f"data.path={path}", "data.novel_fraction=0.3", "sampler.batch_size=16", "optim.lr=0.01",
              "sched=none", "trainer.check_val_every_n_epoch=100"]
    untrained = train(compose_cfg(tmp_path / "a", [*common, "trainer.max_epochs=1", "trainer.limit_train_batches=1",
                                                   "optim.lr=1e-9"]))
    # 20 epochs: at 10 the novel Recall@1 gain was 0.08 at seed 0 on one thread (0.38 -> 0.46), at 20 it is 0.38
    trained = train(compose_cfg(tmp_path / "b", [*common, "trainer.max_epochs=20", "trainer.limit_train_batches=30"]))
    for split in ("base", "novel"):
        assert trained[f"test/{split}/top1"] > untrained[f"test/{split}/top1"] + 0.15, split
        assert trained[f"test/{split}/recall@1"] > untrained[f"test/{split}/recall@1"] + 0.1, split


@pytest.mark.parametrize("overrides", [
    ["loss=l2s_le_mb", "sampler=random"],
    ["loss=l2s", "sampler=doppel", "doppel.top_k=2", "doppel.reduction=mean"],
    ["loss=l2s_le", "sampler=random", "optim=adam", "sampler.examples_per_class=3"],
    ["loss=l2s_mb", "sampler=doppel_balanced", "sampler.cap=1.5"],
])
def test_other_loss_sampler_and_optimiser_combinations(tmp_path, overrides):
    cfg = compose_cfg(tmp_path, [*overrides, "trainer.max_epochs=1"])
    assert_metrics_are_the_reference(tmp_path, cfg, train(cfg))


def test_bad_config_fails_early_with_the_key(tmp_path):
    with pytest.raises(ValueError, match="sampler.random_ratio"):
        train(compose_cfg(tmp_path, ["sampler.random_ratio=0"]))
    with pytest.raises(ValueError, match="sampler.batch_size"):
        train(compose_cfg(tmp_path, ["sampler.batch_size=4000"]))
    with pytest.raises(FileNotFoundError, match="data.path"):
        train(compose_cfg(tmp_path, [f"data.path={tmp_path}/nope.npz"]))


def test_nan_loss_stops_training_with_a_clear_error(tmp_path):
    with pytest.raises(FloatingPointError, match="loss term"):
        train(compose_cfg(tmp_path, ["optim.lr=1e30", "trainer.max_epochs=1"]))


def test_cli_multirun_runs_two_jobs_each_its_own_wandb_run(tmp_path):
    result = run_cli(["-m", "sampler=random,doppel", "logger=wandb", *TINY, "trainer.max_epochs=1",
                   "trainer.limit_train_batches=3", f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep").glob("[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"]
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["test/novel/top1"] >= 0
    runs = {p.name for p in (tmp_path / "sweep").rglob("offline-run-*") if p.is_dir()}
    assert len(runs) == 2
    # one W&B group per multirun: its folder
    from tests.e2e.wandb_records import history, run_settings

    for job in jobs:
        sent = run_settings(next(job.rglob("offline-run-*")))
        assert sent["group"] == f"{tmp_path}/sweep" and sent["job_type"] == "train"
        # the norm histogram W&B got is the one the run wrote
        logged = [h for h in history(next(job.rglob("offline-run-*"))) if "embedding/norm_histogram/values" in h]
        written = json.loads((job / "diagnostics" / "norms.json").read_text())
        assert [h["embedding/norm_histogram/values"] for h in logged] == [e["counts"] for e in written]
        assert logged[-1]["embedding/norm_histogram/bins"] == pytest.approx(written[-1]["edges"])
    assert "final metrics" in result.stdout
    # each W&B run holds the protocol's curve as an image: the PNG the run directory has
    for job in jobs:
        media = list(job.rglob("offline-run-*/files/media/images/eval/precision_coverage*.png"))
        assert len(media) == 1, sorted(str(p) for p in job.rglob("*.png"))
        from PIL import Image

        with Image.open(media[0]) as logged, Image.open(job / "precision_coverage.png") as written:
            assert logged.size == written.size and logged.convert("RGB").tobytes() == written.convert("RGB").tobytes()
        # and the diagnostics: the same pictures as the run directory's, the doppelganger pairs as a table
        for key, written in (("gallery", "gallery_e000"), ("hubs", "hubs_e000"), ("norms", "norms"),
                             ("projection", "projection_e000")):  # the last epoch was validated: no test
            media = list(job.rglob(f"offline-run-*/files/media/images/diagnostics/{key}_*.png"))
            assert len(media) == 1, key
            with Image.open(media[0]) as logged, Image.open(job / "diagnostics" / f"{written}.png") as picture:
                assert logged.convert("RGB").tobytes() == picture.convert("RGB").tobytes(), key
        logged_table = json.loads(next(job.rglob("offline-run-*/files/media/table/diagnostics/doppelgangers_*.json"))
                                  .read_text())
        gallery = json.loads((job / "diagnostics" / "gallery_e000.json").read_text())
        assert [[row[1], row[3], row[6]] for row in logged_table["data"]] == [
            [r["name"], d["name"], pytest.approx(d["score"])] for r in gallery for d in r["doppelgangers"]]
    # the report, with no CSV log, draws the curves from the W&B records; its first table says what ran
    from doppel.report import build_report
    from doppel.run_logs import read_log
    from tests.test_report import _Page

    for job in jobs:
        assert not (job / "csv").exists()
        logged = [h for h in history(next(job.rglob("offline-run-*"))) if "train/loss" in h]
        assert [(r["step"], r["train/loss"]) for r in read_log(job) if "train/loss" in r] == [
            (float(h["trainer/global_step"]), pytest.approx(h["train/loss"])) for h in logged] and logged
    page = _Page()
    page.feed(build_report([tmp_path / "sweep"]))
    assert {"training loss", "learning rate"} <= set(page.images)
    command = page.tables["ran"][1]
    assert command[0] == "command" and command[1].startswith("python train.py sampler=random logger=wandb ")
    assert ["sampler", "random", "doppel"] in page.tables["ran"]


def test_any_trainer_argument_is_set_as_trainer_dot_name_and_a_typo_gets_a_suggestion(tmp_path):
    """``trainer.max_steps=2`` on the command line (not in configs/trainer/default.yaml) stops the run at
    step 2; a misspelt Trainer argument is refused at start-up with the right name suggested."""
    args = [*TINY, "trainer.max_epochs=5", "trainer.check_val_every_n_epoch=5", "logger=none", "report=false",
            "~callbacks.diagnostics"]
    result = run_cli([*args, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}/run"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2
    result = run_cli([*args, "trainer.max_stpes=2", f"hydra.run.dir={tmp_path}/typo"], cwd=tmp_path)
    assert result.returncode != 0
    assert "trainer.max_stpes is not a setting (did you mean max_steps?)" in result.stderr


def test_final_metrics_reuse_a_last_epoch_validation_exactly(tmp_path):
    validated = train(compose_cfg(tmp_path / "val", ["trainer.check_val_every_n_epoch=1"]))
    tested = train(compose_cfg(tmp_path / "test", ["trainer.check_val_every_n_epoch=100"]))
    assert validated == pytest.approx(tested, abs=1e-6)


def test_a_new_sampler_class_is_built_from_the_config_with_the_table_it_declares(tmp_path):
    """No edit of train() or the DataModule: the class says it uses the table and gets it in its context."""
    from tests.e2e.recorder import BatchRecorder

    BatchRecorder.batches.clear()
    train(compose_cfg(tmp_path, ["sampler._target_=tests.sampling.custom.PairsFromTheTable", "~sampler.random_ratio",
                                 "~sampler.warmup_epochs", "~sampler.examples_per_class",
                                 "+callbacks.recorder._target_=tests.e2e.recorder.BatchRecorder",
                                 "trainer.max_epochs=1", "trainer.limit_train_batches=4"]))
    assert len(BatchRecorder.batches) == 4
    for _, labels in BatchRecorder.batches:
        assert len(labels) == 24 and (torch.bincount(torch.tensor(labels)) % 2 == 0).all()  # 2 examples per class


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tmp_path):
    """A softmax run's weights start a center-loss run that cannot move them (lr 0): its backbone and
    softmax classifier are the first run's trained ones, its new center term keeps its initialisation."""
    from doppel.serialization import load_checkpoint

    train(compose_cfg(tmp_path / "softmax", ["loss=softmax", "sampler=random"]))
    first = load_checkpoint(tmp_path / "softmax" / "checkpoints" / "last.ckpt")["state_dict"]
    start = str(tmp_path / "softmax" / "checkpoints" / "last.ckpt")
    fixed = ["loss=center", "sampler=random", "optim.lr=0", "optim.weight_decay=0", "trainer.max_epochs=1",
             "trainer.limit_train_batches=1", f"init_from={start}"]
    train(compose_cfg(tmp_path / "center", fixed))
    second = load_checkpoint(tmp_path / "center" / "checkpoints" / "last.ckpt")["state_dict"]
    weights = [k for k in first if k.startswith("backbone.") and first[k].is_floating_point()
               and "running_" not in k]  # batch-norm statistics move even at lr 0
    assert len(weights) > 10 and all(torch.equal(second[k], first[k]) for k in weights)
    head = [k for k in first if k.startswith("loss_set.") or k.startswith("losses.")]
    assert head and all(torch.equal(second[k], first[k]) for k in head), head
    new = [k for k in second if k not in first]
    assert new and all("center" in k for k in new), new
    with pytest.raises(Exception, match="its backbone does not fit the one this config builds"):
        train(compose_cfg(tmp_path / "wide", [*fixed, "backbone.widths=[16,16,16,16]", "backbone.stem_channels=16",
                                              "backbone.embedding_dim=32"]))


def test_a_second_run_in_a_busy_run_directory_stops_at_once_and_a_killed_runs_lock_is_taken_over(tmp_path):
    import subprocess
    import sys

    from doppel.run_lock import RunDirectoryBusy

    hold = ("import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
            "f.write('pid 4242 on node7'); f.flush(); print('held', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / ".doppel.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryBusy, match=rf"{tmp_path} is in use by another run \(pid 4242 on node7\): "
                                                   r"give this run its own directory \(hydra.run.dir=...\)"):
            train(compose_cfg(tmp_path, ["trainer.max_epochs=1"]))
        assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "csv").exists()  # nothing written
    finally:
        holder.kill()  # SIGKILL, as a lost node or a scancel: the kernel drops its lock
        holder.wait()
    metrics = train(compose_cfg(tmp_path, ["trainer.max_epochs=1", "trainer.limit_train_batches=2"]))
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)


def test_a_run_directory_that_cannot_be_created_is_named_before_hydra_writes_to_it(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    for args, key in ((["hydra.run.dir=a_file/run"], "hydra.run.dir"),
                      (["-m", "seed=0,1", "hydra.sweep.dir=a_file/sweep"], "hydra.sweep.dir")):
        result = run_cli(args, cwd=tmp_path)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == (
            f"Error: {key}='a_file/{key.split('.')[1]}' cannot be created: 'a_file' is a file, not a folder; choose "
            f"another run directory ({key}=...).")
