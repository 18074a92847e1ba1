"""eval.py with eval=ijb on a small release in insightface's layout: the metrics equal insightface's procedure
on the same network's embeddings of the aligned faces and their mirrors; the command prints the table and
writes roc.png."""

import json

import numpy as np
import pytest
import torch

from doppel.data.readers.ijb import read_ijb
from doppel.evaluate import evaluate
from doppel.train import train
from tests.conftest import compose_cfg
from tests.data.ijb_files import write_release
from tests.e2e.cli import run_cli
from tests.evaluation.test_ijb import FARS, _csv_rows, _input_features, transcribed_1n, transcribed_11


def test_eval_ijb_of_an_external_backbone_equals_insightfaces_procedure(tmp_path):
    import timm

    from doppel.models import get_backbone

    written = write_release(tmp_path / "IJB_release", subjects=4, templates_per_subject=3, image_size=(64, 56))
    weights = tmp_path / "resnet10t.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), weights)
    overrides = ["backbone=timm", "backbone.model=resnet10t", f"backbone.pretrained_path={weights}",
                 "backbone.embedding_dim=null", "backbone.input_size=32", "eval=ijb",
                 f"eval.ijb.root={tmp_path / 'IJB_release'}", "data.max_groups=10"]
    metrics = evaluate(compose_cfg(tmp_path / "eval", overrides, tiny_backbone=False), overrides)

    data = read_ijb(tmp_path / "IJB_release", "IJBC")
    net = get_backbone("timm", model="resnet10t", pretrained_path=str(weights), embedding_dim=None, input_size=32)
    net.eval()
    images = torch.stack([data.faces[i] for i in range(len(data.faces))])
    with torch.no_grad():
        plain, flipped = net(images).double().numpy(), net(images.flip(-1)).double().numpy()
    feats = _input_features(plain, flipped, data.detector_scores.astype(np.float64), True, True, True)
    _, tars = transcribed_11(feats, written.templates, written.medias, written.pairs)
    meta = written.folder / "meta"
    gallery = tuple(np.concatenate(p) for p in zip(_csv_rows(meta / "ijbc_1N_gallery_G1.csv"),
                                                   _csv_rows(meta / "ijbc_1N_gallery_G2.csv")))
    probes = _csv_rows(meta / "ijbc_1N_probe_mixed.csv")
    found = transcribed_1n(feats, written.templates, written.medias, gallery, probes)
    for far in FARS:
        assert metrics[f"test/ijbc/tar@far={far:g}"] == pytest.approx(tars[far], abs=1e-9), far
    for name, value in found.items():
        assert metrics[f"test/ijbc/{name}"] == pytest.approx(value, abs=1e-9), name
    assert metrics.objective == "test/ijbc/tar@far=0.0001"
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 1000


def test_python_eval_py_scores_a_checkpoint_on_ijb_and_prints_the_table_on_one_or_two_processes(tmp_path):
    write_release(tmp_path / "IJB_release", subjects=3, templates_per_subject=3, image_size=(40, 36))
    train(compose_cfg(tmp_path / "run", ["trainer.max_epochs=1", "trainer.limit_train_batches=2"]))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    result = run_cli([f"ckpt_path={checkpoint}", "eval=ijb", f"eval.ijb.root={tmp_path / 'IJB_release'}",
                      "eval.ijb.target=IJBC", f"hydra.run.dir={tmp_path / 'eval'}",
                      "trainer.enable_progress_bar=false"],
                     cwd=tmp_path, script="eval.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "IJBC 1:1 TAR (%) at FAR  1e-06:" in result.stdout and "IJBC 1:N  rank-1:" in result.stdout
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert {f"test/ijbc/tar@far={f:g}" for f in FARS} | {"test/ijbc/rank1", "test/ijbc/tpir@fpir=0.01"} <= set(written)
    assert (tmp_path / "eval" / "roc.png").stat().st_size > 1000
    # two processes embed alternate faces; process 0 scores the gathered set: the same metrics
    result = run_cli([f"ckpt_path={checkpoint}", "eval=ijb", f"eval.ijb.root={tmp_path / 'IJB_release'}",
                      f"hydra.run.dir={tmp_path / 'ddp'}", "trainer.enable_progress_bar=false",
                      "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"],
                     cwd=tmp_path, script="eval.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text()) == pytest.approx(written, abs=1e-9)
