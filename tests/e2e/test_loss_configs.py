"""``python train.py loss=<each>`` on a tiny subset of the bundled data, with and without a regulariser."""

import csv
import math

import pytest

from doppel.train import CONFIG_DIR, train
from tests.conftest import compose_cfg
from tests.e2e.reference import assert_metrics_are_the_reference

LOSSES = sorted(path.stem for path in (CONFIG_DIR / "loss").glob("*.yaml"))
SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=3"]


def logged(tmp_path) -> dict[str, list[float]]:
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {key: [float(r[key]) for r in rows if r.get(key)] for key in rows[0]}


def run(tmp_path, overrides):
    cfg = compose_cfg(tmp_path, [*overrides, *SHORT])
    metrics = train(cfg)
    log = logged(tmp_path)
    for name in [*cfg.loss.terms, *(cfg.get("regularizer") or {})]:
        values = log[f"train/loss/{name}"]
        assert len(values) == 3 and all(math.isfinite(v) for v in values), name
    assert_metrics_are_the_reference(tmp_path, cfg, metrics)
    return cfg, metrics, log


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_config_trains(tmp_path, loss):
    cfg, metrics, log = run(tmp_path, [f"loss={loss}"])
    # Prototype losses mine doppelgangers and use the doppel sampler; exemplar-only ones fall back to random.
    prototype = any(".prototype." in term._target_ for term in cfg.loss.terms.values())
    assert metrics.get("doppel/table_filled", 0) > 0 if prototype else "doppel/table_filled" not in metrics, loss
    assert ("doppel/from_table" in log) == prototype


@pytest.mark.parametrize("overrides", [
    ["loss=cosface", "regularizer=sec"],
    ["loss=sphereface", "regularizer=l2reg"],
    ["loss=triplet", "regularizer=sec", "regularizer.sec.weight=0.1"],
    ["loss=ntxent", "regularizer=sec", "regularizer.sec.mu=running", "regularizer.sec.ramp_steps=2"],
    ["loss=ie", "regularizer=sec", "loss.terms.ie.variance=learned", "loss.terms.ie.q_fraction=1.0"],
])
def test_regularisers_add_to_any_family(tmp_path, overrides):
    cfg, _, log = run(tmp_path, overrides)
    name = next(iter(cfg.regularizer))
    assert len(log[f"train/loss/{name}"]) == 3
    if name == "sec":
        assert all(v > 0 for v in log["train/sec/mu"])  # the batch's mean embedding norm
    if "loss=sphereface" in overrides:  # SphereFace's annealing schedule, one step per training call
        assert log["train/sphereface/lambda"] == pytest.approx([1000.0, 1000.0 / 1.12, 1000.0 / 1.24])
    if "regularizer.sec.ramp_steps=2" in overrides:
        assert log["train/sec/ramp"] == [0.0, 0.5, 1.0]


def test_explicit_doppel_sampler_with_an_exemplar_only_loss_fails_early(tmp_path):
    with pytest.raises(ValueError, match="the sampler DoppelgangerBatchSampler needs doppelganger mining"):
        train(compose_cfg(tmp_path, ["loss=triplet", "sampler=doppel", *SHORT]))


def test_two_views_without_augmentation_fail_early(tmp_path):
    off = ["augment.mirror=false", "augment.color_shift=0", "augment.grayscale_p=0"]
    with pytest.raises(ValueError, match="loss.views=2 needs augmentation"):
        train(compose_cfg(tmp_path, ["loss=ntxent", *off, *SHORT]))


def test_two_views_with_a_classifier_loss_train_and_mine_every_view(tmp_path):
    # The miner pairs the loss's 2B logit rows with the labels the loss saw, each label once per view.
    cfg, metrics, log = run(tmp_path, ["loss=l2s_mb", "loss.views=2"])
    assert cfg.loss.views == 2 and metrics["doppel/table_filled"] > 0 and "doppel/from_table" in log
