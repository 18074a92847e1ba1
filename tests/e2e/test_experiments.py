"""Every ``configs/experiment/*.yaml``: each setting of its sweep composes, and the experiment takes a
training step (and evaluates) on tiny data in its format, with the experiment's own sampler, loss and
backbone; the sweeps are the papers' tables."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from doppel.sampling.samplers import parse_random_ratio
from doppel.train import CONFIG_DIR, train
from tests.data.formats import identities, write_pack
from tests.e2e.test_backbone_configs import SMALL
from tests.e2e.test_formats import FORMATS

EXPERIMENTS = sorted(path.stem for path in (CONFIG_DIR / "experiment").glob("*.yaml"))
# One step, small batches (3 identities x the experiment's images per class), quick evaluation.
ONE_STEP = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.check_val_every_n_epoch=1",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "lsuv.batch_size=8",
            "data.eval_batch_size=32", "data.num_workers=0"]
BUNDLED = {"cjk", "emoji"}


def compose_experiment(name: str, overrides: list[str] = ()):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=[f"experiment={name}", *overrides], return_hydra_config=True)


def sweep_settings(cfg) -> list[list[str]]:
    """Every combination of the experiment's sweep, seeds left out (they change no composition)."""
    params = {key: str(values).split(",") for key, values in (cfg.hydra.sweeper.get("params") or {}).items()
              if key != "seed"}
    return [[f"{k}={v}" for k, v in zip(params, combo)] for combo in itertools.product(*params.values())]


def test_there_are_experiments_and_each_names_how_to_run_it():
    assert {"dm_paper", "dm_bundled", "dm_table4_paper", "dm_table4_bundled", "dm_table5_paper",
            "dm_table5_bundled", "dm_table6_paper", "dm_table6_bundled", "ie_mnist_paper", "ie_fashion_mnist",
            "sec_simclr_paper", "sec_simclr_bundled", "sec_dml_paper", "sec_table3_cub_paper",
            "sec_table3_cars_paper", "sec_table3_sop_paper", "sec_table3_inshop_paper", "sec_table4_paper",
            "ie_cifar10_paper", "ie_cifar100_paper", "ie_face_paper", "ie_cifar10_wrn_paper", "ie_cifar100_wrn_paper",
            "sec_table3_bundled", "sec_table4_bundled"} <= set(EXPERIMENTS)
    for name in EXPERIMENTS:
        text = (CONFIG_DIR / "experiment" / f"{name}.yaml").read_text()
        assert text.startswith("# @package _global_") and f"experiment={name}" in text, name


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_setting_of_the_experiment_composes(name):
    cfg = compose_experiment(name)
    for setting in sweep_settings(cfg):
        chosen = compose_experiment(name, setting)
        for override in setting:
            key, value = override.split("=", 1)
            if key in chosen.hydra.runtime.choices:
                assert chosen.hydra.runtime.choices[key] == value
            else:
                assert str(OmegaConf.select(chosen, key)) == value


def run_config(name: str) -> str:
    """The experiment's settings for one run (its sweep and output folder left out)."""
    cfg = compose_experiment(name)
    with open_dict(cfg):
        del cfg.hydra
    return OmegaConf.to_yaml(cfg)


def distinct_runs() -> dict[str, list[str]]:
    """Experiments grouped by the run they configure: a table's sweep around a recipe runs that recipe."""
    groups: dict[str, list[str]] = {}
    for name in EXPERIMENTS:
        groups.setdefault(run_config(name), []).append(name)
    return {names[0]: names for names in groups.values()}


@pytest.mark.parametrize("name", sorted(distinct_runs()))
def test_the_experiment_takes_a_training_step_on_tiny_data_in_its_format(tmp_path, name):
    composed = compose_experiment(name)
    choice = composed.hydra.runtime.choices["data"]
    data = ["data.max_groups=40"] if choice in BUNDLED else FORMATS[choice](tmp_path)
    if "verification" in composed.eval:  # the packs lie beside the training data, as InsightFace ships them
        write_pack(tmp_path / "lfw.bin", identities())
    if composed.backbone.name == "bn_inception":  # five stride-2 stages: 16-pixel crops would vanish
        data += ["data.resize=72", "data.crop=64"]
    if composed.backbone.name == "face_resnet":
        # Table 1's layers at 259x259, narrower (a minute a step at full width; test_backbone_configs runs that)
        data += ["backbone.stem_channels=8", "backbone.widths=[8,16,16,32]"]
    if composed.backbone.name in ("resnet50_ir", "se_resnet50_ir"):
        data += SMALL[composed.backbone.name]
    per_class = compose_experiment(name, data).sampler.examples_per_class
    fewest = per_class if isinstance(per_class, int) else min(per_class)
    cfg = compose_experiment(name, [*data, *ONE_STEP, f"sampler.batch_size={3 * fewest}"])
    with open_dict(cfg):
        del cfg.hydra
        cfg.paths.output_dir = str(tmp_path / "run")
    metrics = train(cfg)
    assert metrics["train/epochs"] == 1
    assert all(math.isfinite(value) for value in metrics.values())
    assert (Path(tmp_path) / "run" / "metrics.json").is_file()


def test_every_experiment_runs_one_of_the_configurations_stepped_above():
    stepped = distinct_runs()
    assert sorted(name for names in stepped.values() for name in names) == EXPERIMENTS
    assert stepped["dm_bundled"] == ["dm_bundled", "dm_table4_bundled", "dm_table5_bundled"]
    assert stepped["ie_fashion_mnist"] == ["ie_fashion_mnist"]  # another data folder and schedule


def test_the_tables_sweep_what_the_papers_vary():
    for variant in ("paper", "bundled"):
        table4 = compose_experiment(f"dm_table4_{variant}").hydra.sweeper.params
        assert str(table4.loss).split(",") == ["l2s", "l2s_le", "l2s_mb", "l2s_le_mb"]
        assert [parse_random_ratio(r) for r in str(table4["sampler.random_ratio"]).split(",")] == [1.0, 9 / 27]
        table5 = compose_experiment(f"dm_table5_{variant}").hydra.sweeper.params
        ratios = [parse_random_ratio(r) for r in str(table5["sampler.random_ratio"]).split(",")]
        assert ratios == [n / 27 for n in (1, 2, 3, 6, 9, 15, 21, 27)]  # Table 5's rows
        table6 = compose_experiment(f"dm_table6_{variant}")
        assert str(table6.hydra.sweeper.params["sampler.random_ratio"]) == str(table5["sampler.random_ratio"])
        assert list(table6.eval) == ["prototype", "classifier_learning"]  # each network before and after stage 2
        assert (table6.eval.classifier_learning.iterations, table6.eval.classifier_learning.batch_size,
                table6.eval.classifier_learning.lr, table6.eval.classifier_learning.lr_end) == (500, 81, 1e-3, 1e-4)
        if variant == "bundled":
            assert str(table6.hydra.sweeper.params.seed) == str(table5.seed)
            assert str(table4.seed).split(",") == str(table5.seed).split(",") == ["0", "1", "2", "3", "4"]
    for variant in ("paper", "bundled"):
        simclr = compose_experiment(f"sec_simclr_{variant}")
        assert str(simclr.hydra.sweeper.params.regularizer).split(",") == ["none", "l2reg", "sec"]  # Table 5
        assert (simclr.hydra.runtime.choices["augment"], list(simclr.eval), simclr.loss.views,
                simclr.loss.terms.ntxent.temperature) == ("simclr", ["linear_probe"], 2, 0.5)
    for dataset, lr, milestones, steps in (("cub", 1e-5, [5000], 8000), ("cars", 1e-5, [2000], 8000),
                                           ("sop", 2.5e-4, [6000], 12000), ("inshop", 5e-4, [6000], 12000)):
        dml = compose_experiment(f"sec_table3_{dataset}_paper")  # Table 3, the authors' schedule per set
        assert dml.hydra.runtime.choices["data"] == dataset and list(dml.eval) == ["retrieval"]
        assert str(dml.hydra.sweeper.params.loss).split(",") == ["triplet", "semihard", "npair", "ms"]
        assert str(dml.hydra.sweeper.params.regularizer).split(",") == ["none", "l2reg", "sec"]
        assert (dml.backbone.name, dml.backbone.embedding_dim, dml.sampler.batch_size, dml.data.crop,
                list(dml.data.crop_scale)) == ("bn_inception", 512, 120, 227, [0.16, 1.0])
        assert (dml.optim._target_, dml.optim.lr, list(dml.sched.milestones), dml.trainer.max_steps) == (
            "torch.optim.Adam", lr, milestones, steps)
    for bundled, paper in (("sec_table3_bundled", "sec_table3_cub_paper"), ("sec_table4_bundled", "sec_table4_paper")):
        params, reference = (compose_experiment(name).hydra.sweeper.params for name in (bundled, paper))
        assert (params.loss, params.regularizer) == (reference.loss, reference.regularizer)  # the same rows
        assert str(params.seed).split(",") == ["0", "1", "2", "3", "4"]
    assert list(compose_experiment("sec_table3_bundled").eval) == ["retrieval"]
    faces = compose_experiment("sec_table4_paper")  # Table 4
    assert str(faces.hydra.sweeper.params.loss).split(",") == ["sphereface", "cosface", "arcface"]
    assert (faces.backbone.name, faces.sampler.batch_size, list(faces.eval)) == ("se_resnet50_ir", 256,
                                                                                 ["verification"])
    for loss, margin in (("sphereface", 3), ("cosface", 0.35), ("arcface", 0.45)):
        term = compose_experiment("sec_table4_paper", [f"loss={loss}"]).loss.terms[loss]
        assert (term.scale, term.margin) == (64.0, margin)
    for classes, weight in ((10, 0.07), (100, 0.007)):  # Tables 3 and 4 [N], IE at Tables B.2 / B.3
        cifar = compose_experiment(f"ie_cifar{classes}_paper")
        assert str(cifar.hydra.sweeper.params.loss).split(",") == ["softmax", "lsoftmax", "center",
                                                                   f"ie_cifar{classes}"]
        assert (cifar.backbone.name, cifar.optim.lr, list(cifar.sched.milestones), cifar.trainer.max_steps) == (
            f"ie_cnn_cifar{classes}", 0.01, [10000, 17000], 22000)
        assert (cifar.loss.terms.ie.weight, cifar.loss.terms.ie.alpha) == (weight, 0.1)
    for classes, pad in ((10, 4), (100, 0)):  # [P]: WRN-28-10, pad-and-crop on CIFAR-10 only
        wrn = compose_experiment(f"ie_cifar{classes}_wrn_paper")
        assert (wrn.backbone.name, wrn.sampler.batch_size, wrn.augment.pad_crop, wrn.augment.mirror,
                str(wrn.hydra.sweeper.params.loss)) == ("wrn28_10", 128, pad, True, "softmax")
    face = compose_experiment("ie_face_paper")  # Table 6 [N]: the face setting of IE (sec. 4.3)
    assert str(face.hydra.sweeper.params.loss).split(",") == ["softmax", "lsoftmax", "center", "ie"]
    assert (face.backbone.name, list(face.backbone.input_size), face.sampler.batch_size, face.optim.lr,
            list(face.sched.milestones), face.trainer.max_steps) == ("ie_face_resnet", [112, 96], 256, 0.1,
                                                                      [16000, 24000], 28000)
    assert (face.loss.terms.ie.weight, face.loss.terms.ie.q_fraction, face.eval.verification.flip) == (0.05, 0.2,
                                                                                                      True)
    ie = compose_experiment("ie_mnist_paper")
    assert str(ie.hydra.sweeper.params.loss).split(",") == ["softmax", "lsoftmax", "center", "ie_mnist"]
    assert (ie.sampler.batch_size, ie.optim.lr, list(ie.sched.milestones), ie.trainer.max_steps) == (
        256, 0.01, [12000, 15000], 20000)  # sec. 4.2, MNIST
    assert (ie.loss.terms.ie.weight, ie.loss.terms.ie.alpha) == (0.15, 0.1)  # Table B.1 (b)
    paper = compose_experiment("dm_paper")
    assert (paper.backbone.name, paper.backbone.input_size, paper.sampler.batch_size,
            paper.sampler.examples_per_class, paper.trainer.max_steps) == ("face_resnet", 259, 81, 3, 300000)
    assert paper.hydra.runtime.choices["data"] == "mslowshot"
