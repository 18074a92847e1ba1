"""A crafted checkpoint runs nothing, from a file or a URL; unreadable files get one clear sentence."""

import http.server
import os
import random
import subprocess
import sys
import threading

import pytest
import torch

from doppel.serialization import CheckpointError
from doppel.train import train
from tests.conftest import compose_cfg
from tests.e2e.cli import run_cli

SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2"]


class Payload:
    """Unpickling this writes ``marker``: what an attacker's checkpoint would do, made harmless."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture
def crafted(tmp_path):
    """A real Doppel last.ckpt with a payload added, and the file the payload would create."""
    train(compose_cfg(tmp_path / "source", SHORT))
    checkpoint = torch.load(tmp_path / "source" / "checkpoints" / "last.ckpt", weights_only=True)
    marker = tmp_path / "payload_ran"
    checkpoint["extra"] = Payload(marker)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path, marker


def test_the_payload_is_live(crafted):
    path, marker = crafted
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(path)!r}, weights_only=False)"],
                   check=True, env={k: v for k, v in os.environ.items() if k != "TORCH_FORCE_WEIGHTS_ONLY_LOAD"})
    assert marker.read_text() == "ran"  # so the tests below would see it if it ran


@pytest.mark.parametrize("force_unsafe", [False, True])
def test_a_crafted_checkpoint_file_is_refused_unrun(crafted, tmp_path, monkeypatch, force_unsafe):
    path, marker = crafted
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    if force_unsafe:  # the switch that makes a plain torch.load unpickle anything: ours asks explicitly
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(CheckpointError, match=r"holds Python objects, not only tensors and plain data \(loading "
                                              r"it would call exec\): refused, nothing in it was run"):
        train(compose_cfg(tmp_path / "resume", [*SHORT, f"ckpt_path={path}"]))
    assert not marker.exists()


def test_a_checkpoint_served_over_http_is_refused_without_a_request(crafted, tmp_path):
    path, marker = crafted
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(path.parent), **kwargs)

        def do_GET(self):  # noqa: N802 - the standard library's name
            requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
    try:
        with pytest.raises(CheckpointError, match="is a remote address: Doppel reads checkpoints from local files"):
            train(compose_cfg(tmp_path / "resume", [*SHORT, f"ckpt_path={url}"]))
        result = run_cli([*SHORT, f"ckpt_path={url}", f"hydra.run.dir={tmp_path}/cli"], cwd=tmp_path)
    finally:
        server.shutdown()
    assert result.returncode == 1 and "is a remote address" in result.stderr
    assert requests == [] and not marker.exists()


def test_random_bytes_as_a_checkpoint_get_a_clear_error(tmp_path):
    path = tmp_path / "random.ckpt"
    path.write_bytes(random.Random(4096).randbytes(4096))
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        train(compose_cfg(tmp_path / "run", [*SHORT, f"ckpt_path={path}"]))


def test_crafted_backbone_weights_are_refused_unrun(crafted, tmp_path):
    path, marker = crafted
    weights = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1), "extra": Payload(marker)}, weights)
    with pytest.raises(CheckpointError, match="backbone.checkpoint=.* holds Python objects"):
        train(compose_cfg(tmp_path / "bn", ["backbone=bn_inception", "backbone.input_size=64", *SHORT,
                                            f"backbone.checkpoint={weights}"], tiny_backbone=False))
    with pytest.raises(CheckpointError, match="backbone.pretrained_path=.* holds Python objects"):
        train(compose_cfg(tmp_path / "timm", ["backbone=timm", "backbone.model=resnet18", "backbone.input_size=32",
                                              *SHORT, f"backbone.pretrained_path={weights}"], tiny_backbone=False))
    assert not marker.exists()
