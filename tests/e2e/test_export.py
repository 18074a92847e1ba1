"""export.py: the ONNX file (any batch size) and the TorchScript file compute the checkpoint's embeddings from
the preprocessing their metadata describes; every backbone config exports, or fails with one sentence."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from doppel.evaluate import checkpoint_backbone, run_checkpoint, with_run_settings
from doppel.export import ExportError, export
from doppel.train import CONFIG_DIR, train
from tests.conftest import compose_cfg
from tests.e2e.cli import run_cli

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    train(compose_cfg(folder, ["trainer.max_epochs=1", "trainer.limit_train_batches=2"]))
    return folder / "checkpoints" / "last.ckpt"


def _by_metadata(properties, images):
    """The exported graph's input made from 0-255 RGB images by what the metadata says, not by the network."""
    height, width = (int(v) for v in properties["doppel.input_size"].split(","))
    x = F.interpolate(images.float(), size=(height, width), mode="bilinear", align_corners=False,
                      antialias=images.shape[-1] > width)
    if properties["doppel.channels"] == "luma":
        x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    elif properties["doppel.channels"] == "bgr":
        x = x.flip(1)
    mean = torch.tensor(json.loads(properties["doppel.mean"])).view(1, -1, 1, 1)
    std = torch.tensor(json.loads(properties["doppel.std"])).view(1, -1, 1, 1)
    return (x * float(properties["doppel.scale"]) - mean) / std


def test_python_export_py_writes_an_onnx_model_that_computes_the_checkpoints_embeddings(run, tmp_path):
    result = run_cli([f"ckpt_path={run}", "format=onnx", f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path,
                     script="export.py")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = next(line for line in result.stdout.splitlines() if line.startswith("export:"))
    assert float(printed.split("embeddings from PyTorch's is ")[1].split()[0]) <= 1e-4
    path = tmp_path / "out" / "model.onnx"
    model = onnx.load(str(path))
    properties = {p.key: p.value for p in model.metadata_props}
    assert properties["doppel.channels"] == "rgb" and properties["doppel.embedding_dim"] == "16"

    checkpoint = run_checkpoint(str(run))
    cfg = with_run_settings(compose_cfg(tmp_path / "x"), checkpoint["doppel"]["config"], [])
    net = checkpoint_backbone(cfg, checkpoint, str(run), 32).eval()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)  # 5: not the batch it was traced with
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": _by_metadata(properties, images).numpy()})[0]
    with torch.no_grad():
        expected = net(images)
    np.testing.assert_allclose(F.normalize(torch.from_numpy(got), dim=1), F.normalize(expected, dim=1), atol=1e-4)


def test_torchscript_keeps_the_metadata_and_the_embeddings(run, tmp_path):
    overrides = [f"ckpt_path={run}", "format=torchscript"]
    path = export(compose_cfg(tmp_path, overrides, config_name="export"), overrides)
    extra = {"doppel.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    properties = json.loads(extra["doppel.json"])
    assert properties["doppel.input_size"] == "32,32" and properties["doppel.mirror_fusion"] == "false"
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    checkpoint = run_checkpoint(str(run))
    cfg = with_run_settings(compose_cfg(tmp_path / "x"), checkpoint["doppel"]["config"], [])
    net = checkpoint_backbone(cfg, checkpoint, str(run), 32).eval()
    with torch.no_grad():
        torch.testing.assert_close(F.normalize(loaded(_by_metadata(properties, images)), dim=1),
                                   F.normalize(net(images), dim=1), atol=1e-5, rtol=0)


BACKBONES = sorted(p.stem for p in (CONFIG_DIR / "backbone").glob("*.yaml"))
SMALL = {  # a smaller size of the big networks: the export path is the same, the test minutes fewer
    "timm": ["backbone.model=resnet18", "backbone.input_size=64"], "face_resnet": ["backbone.input_size=99"],
    "resnet50_ir": ["backbone.input_size=56"], "se_resnet50_ir": ["backbone.input_size=56"],
    "bn_inception": ["backbone.input_size=96"], "wrn28_10": ["backbone.widen_factor=2"],
}


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_config_exports_to_onnx_with_the_printed_parity(backbone, tmp_path, capsys):
    overrides = [f"backbone={backbone}", *SMALL.get(backbone, []), "data=emoji", "data.max_groups=30",
                 "export.check_images=4"]
    path = export(compose_cfg(tmp_path, overrides, tiny_backbone=False, config_name="export"), overrides)
    assert Path(path).stat().st_size > 1000
    printed = capsys.readouterr().out
    assert float(printed.split("embeddings from PyTorch's is ")[1].split()[0]) <= 1e-4


def test_an_operator_onnx_lacks_is_refused_in_one_sentence(tmp_path, monkeypatch):
    import doppel.export as exporting

    class Unsupported(torch.nn.Module):
        def forward(self, x):
            return torch.linalg.eigh(x.flatten(1).T @ x.flatten(1))[0][None].expand(len(x), -1)

    monkeypatch.setattr(exporting, "AfterPreprocess", lambda net: Unsupported())
    overrides = ["format=onnx", "data=emoji", "data.max_groups=30", "export.check_images=2"]
    with pytest.raises(ExportError, match=r"format=onnx: this backbone cannot be written as ONNX opset 17: .*Try "
                                          r"export.opset=18, or format=torchscript"):
        export(compose_cfg(tmp_path, overrides, config_name="export"), overrides)
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "model.partial").exists()


def test_a_file_that_computes_something_else_is_caught_and_removed(tmp_path, monkeypatch):
    """onnxruntime made to answer a little off: the parity check refuses the file."""
    real = onnxruntime.InferenceSession

    class Off:
        def __init__(self, *args, **kwargs):
            self.session = real(*args, **kwargs)

        def run(self, *args, **kwargs):
            return [output + 0.05 for output in self.session.run(*args, **kwargs)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", Off)
    overrides = ["format=onnx", "data=emoji", "data.max_groups=30", "export.check_images=4"]
    with pytest.raises(ExportError, match=r"the exported network differs from PyTorch's by .* on real images "
                                          r"\(tolerance export.tolerance=0.0001\); the file was removed"):
        export(compose_cfg(tmp_path, overrides, config_name="export"), overrides)
    assert not (tmp_path / "model.onnx").exists()
