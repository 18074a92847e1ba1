"""``python train.py backbone=<each>`` on the bundled-format data: a short run at a small input size
where the architecture allows one, one training step at the paper's size otherwise."""

from __future__ import annotations

import math

import pytest

from doppel.train import CONFIG_DIR, train
from tests.conftest import compose_cfg, write_emoji_npz
from tests.e2e.reference import assert_metrics_are_the_reference
from tests.e2e.test_loss_configs import logged

BACKBONES = sorted(path.stem for path in (CONFIG_DIR / "backbone").glob("*.yaml"))

SMALL = {  # a reduced input size the architecture accepts (None: its own size is already small)
    "bn_inception": ["backbone.input_size=64"],
    "resnet50_ir": ["backbone.input_size=32"],
    "se_resnet50_ir": ["backbone.input_size=32"],
    "ie_cnn_mnist": [],
    "ie_cnn_cifar10": [],
    "ie_cnn_cifar100": [],
    "face_resnet_small": [],
    "timm": ["backbone.model=resnet18", "backbone.input_size=32"],
}
# Paper-size networks that do not shrink (valid convolutions, or 32x32 is their size): one step, few images.
FULL_SIZE = ["trainer.max_epochs=1", "trainer.limit_train_batches=1", "sampler.batch_size=8", "lsuv.batch_size=2",
             "data.eval_batch_size=16", "data.max_groups=null"]


def test_every_backbone_config_is_covered():
    assert set(BACKBONES) == set(SMALL) | {"face_resnet", "ie_face_resnet", "wrn28_10"}


@pytest.mark.parametrize("backbone", sorted(SMALL))
def test_backbone_trains_at_a_small_input_size(tmp_path, backbone):
    cfg = compose_cfg(tmp_path, [f"backbone={backbone}", *SMALL[backbone], "trainer.max_epochs=1",
                                 "trainer.limit_train_batches=2",
                                 "data.max_groups=20"], tiny_backbone=backbone == "face_resnet_small")
    metrics = train(cfg)
    losses = logged(tmp_path)["train/loss"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert_metrics_are_the_reference(tmp_path, cfg, metrics)


@pytest.mark.parametrize("backbone", ["face_resnet", "ie_face_resnet", "wrn28_10"])
def test_full_size_backbone_takes_a_training_step(tmp_path, backbone):
    # A handful of 16x16 images in the bundled format, upscaled to the paper's input by the backbone.
    data = write_emoji_npz(tmp_path / "few.npz", n_families=4)
    cfg = compose_cfg(tmp_path, [f"backbone={backbone}", *FULL_SIZE, "data=emoji", f"data.path={data}"],
                      tiny_backbone=False)
    metrics = train(cfg)
    losses = logged(tmp_path)["train/loss"]
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert_metrics_are_the_reference(tmp_path, cfg, metrics)


@pytest.mark.parametrize("speed", [
    ["speed.channels_last=true", "trainer.precision=bf16-mixed"],
    # Inductor's code generation takes minutes on 2 CPU cores; aot_eager traces the same graphs.
    ["speed.compile=true", "speed.compile_backend=aot_eager"],
])
def test_speed_options_train(tmp_path, speed):
    cfg = compose_cfg(tmp_path, [*speed, "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                                 "data.max_groups=20"])
    metrics = train(cfg)
    losses = logged(tmp_path)["train/loss"]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert_metrics_are_the_reference(tmp_path, cfg, metrics)
