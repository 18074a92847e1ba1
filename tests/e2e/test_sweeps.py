"""Optuna searches (configs/hparams_search/) through the command line, as a user runs them."""

from __future__ import annotations

import json

import pytest
import yaml
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIGS, TINY
from tests.e2e.cli import run_cli

# TINY's examples per class would override the search's own choice of them
SHORT = [o for o in TINY if not o.startswith("sampler.examples_per_class")] + [
    "trainer.max_epochs=1", "trainer.limit_train_batches=3", "~callbacks.diagnostics"]


def test_an_optuna_search_runs_its_trials_and_reports_the_best_one(tmp_path):
    sweep = tmp_path / "sweep"
    result = run_cli(["-m", "hparams_search=doppel_ratio", "hydra.sweeper.n_trials=3", "objective=test/novel/top1",
                      *SHORT, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted((p for p in sweep.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert [j.name for j in jobs] == ["0", "1", "2"]
    values, sampled = [], []
    for job in jobs:
        values.append(json.loads((job / "metrics.json").read_text())["test/novel/top1"])
        overrides = dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))
        trial = {"sampler.random_ratio": float(overrides["sampler.random_ratio"]),
                 "sampler.examples_per_class": int(overrides["sampler.examples_per_class"]),
                 "optim.lr": float(overrides["optim.lr"])}
        assert 0.03 <= trial["sampler.random_ratio"] <= 1.0 and 0.002 <= trial["optim.lr"] <= 0.05
        assert trial["sampler.examples_per_class"] in (2, 3, 4)
        sampled.append(trial)
        # the trial's settings are the ones the run used
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert config["sampler"]["random_ratio"] == pytest.approx(trial["sampler.random_ratio"])
        assert config["sampler"]["_target_"].endswith("DoppelgangerBatchSampler")
    assert len({json.dumps(s, sort_keys=True) for s in sampled}) == 3
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(values))
    assert best["best_params"] == pytest.approx(sampled[values.index(max(values))])


def test_a_search_for_a_metric_the_run_does_not_have_stops_before_training(tmp_path):
    result = run_cli(["-m", "hparams_search=lr", "hydra.sweeper.n_trials=1", "objective=test/novel/acc",
                      *SHORT, f"hydra.sweep.dir={tmp_path}/sweep"], cwd=tmp_path)
    assert result.returncode != 0
    assert "objective=test/novel/acc is not a metric of this run" in result.stderr
    assert not list((tmp_path / "sweep").glob("*/checkpoints"))


@pytest.mark.parametrize("search", ["doppel_ratio", "margins", "sec_weight", "lr"])
def test_every_search_composes_and_names_keys_the_config_has(search):
    with initialize_config_dir(CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=[f"hparams_search={search}"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.direction == "maximize"
    for key in cfg.hydra.sweeper.params:
        node = cfg
        for part in key.split("."):
            assert part in node, f"hparams_search={search}: {key} is not in the composed config"
            node = node[part]
