"""embed.py writes every image's embedding as the network gives it (mirror fused, unit rows, image order, one
process or two), and doppel.search finds an image of the archive as its own nearest row."""

import csv

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from doppel.embed import _write_archive, embed
from doppel.search import main as search_main
from doppel.search import nearest, read_archive
from doppel.train import train
from tests.conftest import compose_cfg
from tests.e2e.cli import run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    train(compose_cfg(folder, ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "data.max_groups=20"]))
    return folder / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """An image folder (data=folder): 6 identities x 15 PNGs."""
    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for person in range(6):
        (root / f"person {person}").mkdir()
        for shot in range(15):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"person {person}" / f"{shot:02d}.png")
    return root


def _expected(cfg, checkpoint, flip):
    """The rows computed here, without Lightning or part files: the checkpoint's backbone weights loaded by
    hand, every image through the data's transform in one batch, mirror summed, normalised."""
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.setup()
    data = datamodule.data
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    weights = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    images = torch.stack([datamodule.transform(data.images[i], None) for i in range(len(data.images))])
    net = instantiate(cfg.backbone, image_size=images.shape[-1])
    net.load_state_dict(weights)
    net.eval()
    with torch.no_grad():
        features = net(images) + (net(images.flip(-1)) if flip else 0)
    return F.normalize(features, dim=1).numpy(), data


@pytest.mark.parametrize("flip", ["auto", "true"])
def test_embed_writes_every_images_unit_embedding_and_its_index(run, faces, tmp_path, flip):
    overrides = [f"ckpt_path={run}", f"embed.flip={flip}", "data=folder", f"data.root={faces}"]
    archive = read_archive(embed(compose_cfg(tmp_path, overrides), overrides))
    expected, data = _expected(archive.config, run, flip == "true")
    assert archive.flip == (flip == "true")  # auto: as the run's protocol (characters are not mirrored)
    np.testing.assert_allclose(archive.embeddings, expected, atol=2e-5)
    assert archive.embeddings.shape == (90, 16) and archive.readable.all()
    assert isinstance(archive.embeddings, np.memmap)  # stored uncompressed: mapped, not read
    np.testing.assert_array_equal(archive.labels, data.labels.numpy())
    with open(tmp_path / "index.csv", newline="") as file:
        lines = list(csv.reader(file))
    assert lines[0] == ["row", "label", "class_name", "image", "readable"] and len(lines) == len(data.labels) + 1
    assert lines[1 + 37] == ["37", "2", "person 2", str(faces / "person 2" / "07.png"), "1"]


def test_the_archive_interleaves_the_processes_parts_in_image_order(tmp_path):
    """Row i comes from part i % world at i // world, across write blocks."""
    import doppel.embed as embedding

    total, dim, world = 23, 3, 3
    values = np.arange(total * dim, dtype=np.float32).reshape(total, dim)
    for rank in range(world):
        np.save(tmp_path / f"rank{rank}.npy", values[rank::world])
        np.save(tmp_path / f"readable{rank}.npy", np.arange(total)[rank::world] != 5)
    old = embedding.ROWS_PER_WRITE
    embedding.ROWS_PER_WRITE = 4  # blocks of 3 rows: many blocks, a short last one
    try:
        readable = _write_archive(tmp_path / "out.npz", tmp_path, world, total, dim, {"labels": np.zeros(total)})
    finally:
        embedding.ROWS_PER_WRITE = old
    with np.load(tmp_path / "out.npz", allow_pickle=False) as stored:
        np.testing.assert_array_equal(stored["embeddings"], values)
        np.testing.assert_array_equal(stored["readable"], np.arange(total) != 5)
    np.testing.assert_array_equal(readable, np.arange(total) != 5)


def test_two_processes_write_the_archive_one_process_writes(run, faces, tmp_path):
    common = [f"ckpt_path={run}", "data=folder", f"data.root={faces}", "trainer.enable_progress_bar=false",
              "data.eval_batch_size=16"]
    one = run_cli([*common, f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path, script="embed.py")
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli([*common, f"hydra.run.dir={tmp_path / 'two'}", "trainer.accelerator=cpu", "trainer.devices=2",
                   "trainer.strategy=ddp"], cwd=tmp_path, script="embed.py")
    assert two.returncode == 0, two.stderr[-3000:]
    first, second = read_archive(tmp_path / "one" / "embeddings.npz"), read_archive(tmp_path / "two" / "embeddings.npz")
    np.testing.assert_allclose(first.embeddings, second.embeddings, atol=1e-5)
    assert (tmp_path / "one" / "index.csv").read_bytes() == (tmp_path / "two" / "index.csv").read_bytes()
    assert not (tmp_path / "two" / "embeddings.parts").exists()


def test_search_finds_an_archived_image_as_its_own_nearest_row(run, faces, tmp_path, capsys):
    overrides = [f"ckpt_path={run}", "data=folder", f"data.root={faces}"]
    path = embed(compose_cfg(tmp_path, overrides), overrides)
    archive = read_archive(path)
    _, data = _expected(archive.config, run, False)
    queries = tmp_path / "queries"
    queries.mkdir()
    picked = [3, 50, 71]
    for row in picked:  # PNG: the query's pixels are the archived image's
        Image.fromarray(data.images[row].permute(1, 2, 0).numpy()).save(queries / f"q{row:03d}.png")
    assert search_main([str(path), "--query", str(queries), "-k", "3", "--backend", "torch"]) == 0
    printed = capsys.readouterr().out.splitlines()
    for position, row in enumerate(picked):
        block = printed[4 * position:4 * position + 4]
        assert block[0].endswith(f"q{row:03d}.png:")
        rank, score = block[1].split()[:2]
        assert rank == "1" and float(score) == pytest.approx(1.0, abs=1e-4) and f"  row {row}  " in block[1]
        assert f"  {data.class_names[int(data.labels[row])]}  row" in block[1]
    assert search_main([str(path), "--query", str(tmp_path / "missing.png")]) == 1
    assert "neither an image file nor a folder" in capsys.readouterr().err


def test_faiss_and_torch_find_the_same_rows_as_a_brute_force_search(monkeypatch):
    """In chunks of rows, unreadable rows skipped: both backends give the rows of a plain argsort."""
    pytest.importorskip("faiss")
    import doppel.search as search

    generator = torch.Generator().manual_seed(0)
    gallery = F.normalize(torch.randn(20000, 32, generator=generator), dim=1).numpy()
    queries = F.normalize(torch.randn(50, 32, generator=generator), dim=1).numpy()
    readable = np.random.default_rng(0).random(20000) > 0.1
    similarity = np.where(readable[None], queries @ gallery.T, -np.inf)
    brute = np.argsort(-similarity, axis=1, kind="stable")[:, :10]
    found = {}
    for chunk in (4096, 2 ** 16):  # several chunks, one chunk
        monkeypatch.setattr(search, "CHUNK_ROWS", chunk)
        for backend in ("torch", "faiss"):
            found[chunk, backend] = nearest(gallery, queries, 10, backend=backend, readable=readable)
    for scores, rows in found.values():
        np.testing.assert_array_equal(rows, brute)
        np.testing.assert_allclose(scores, np.take_along_axis(similarity, brute, 1), atol=1e-5)


def test_an_unreadable_image_is_named_or_left_out_as_a_zero_row(run, faces, tmp_path):
    broken = tmp_path / "faces"
    import shutil

    shutil.copytree(faces, broken)
    (broken / "person 1" / "04.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    overrides = [f"ckpt_path={run}", "data=folder", f"data.root={broken}"]
    with pytest.raises(Exception, match=r"person 1/04.png is not a readable image"):
        embed(compose_cfg(tmp_path / "strict", overrides), overrides)
    overrides.append("data.skip_corrupt=true")
    with pytest.warns(UserWarning, match=r"1 unreadable images were left out \(rows of zeros, readable=0 in "
                                         r"index.csv\), e.g. .*person 1/04.png"):
        archive = read_archive(embed(compose_cfg(tmp_path / "kept", overrides), overrides))
    left_out = 15 + 4  # person 1's fifth image
    assert np.flatnonzero(~archive.readable).tolist() == [left_out]
    assert not archive.embeddings[left_out].any()
    np.testing.assert_allclose(np.linalg.norm(np.delete(archive.embeddings, left_out, 0), axis=1), 1, atol=1e-5)
    with open(tmp_path / "kept" / "index.csv", newline="") as file:
        assert list(csv.reader(file))[1 + left_out][4] == "0"


def test_an_external_backbone_embeds_as_its_weights_compute(faces, tmp_path):
    import timm

    weights = tmp_path / "resnet10t.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), weights)
    overrides = ["backbone=timm", "backbone.model=resnet10t", f"backbone.pretrained_path={weights}",
                 "backbone.embedding_dim=null", "backbone.input_size=32", "data=folder", f"data.root={faces}",
                 "embed.flip=true"]
    archive = read_archive(embed(compose_cfg(tmp_path / "out", overrides, tiny_backbone=False), overrides))
    from doppel.models import get_backbone

    net = get_backbone("timm", model="resnet10t", pretrained_path=str(weights), embedding_dim=None, input_size=32)
    net.eval()
    files = [faces / f"person {p}" / f"{s:02d}.png" for p in range(6) for s in range(15)]
    images = torch.stack([torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1) for f in files])
    with torch.no_grad():
        expected = F.normalize(net(images) + net(images.flip(-1)), dim=1).numpy()
    np.testing.assert_allclose(archive.embeddings, expected, atol=2e-5)
    assert archive.checkpoint == "" and archive.embeddings.shape == (90, 512)
