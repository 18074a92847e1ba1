"""The diagnostics' pictures show what they claim: counts equal numpy's, the gallery the data's pixels and the
table's pairs, the projection numpy's principal components."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from doppel.callbacks import figures
from doppel.callbacks.diagnostics import Diagnostics
from doppel.data.datamodule import IdentityDataModule
from doppel.evaluation.protocol import Embedded
from doppel.losses.loss_set import LossSet
from doppel.module import DoppelModule
from doppel.sampling.doppelganger import DoppelgangerTable
from doppel.train import train
from tests.conftest import compose_cfg, write_emoji_npz


@pytest.mark.parametrize("bins", [1, 7, 40])
def test_histogram_counts_are_numpys(bins):
    rng = np.random.default_rng(bins)
    values = np.concatenate([rng.gamma(4.0, 1.5, 997), [0.25, 9.75]])
    low, high = float(values.min()), float(values.max())
    edges = np.linspace(low, high, bins + 1)
    # values on every edge and one float either side: where float rounding puts a value in the wrong bin
    values = np.concatenate([values, edges, np.nextafter(edges, -np.inf), np.nextafter(edges, np.inf)])
    expected, expected_edges = np.histogram(values, bins=bins, range=(low, high))
    assert figures.histogram(torch.from_numpy(values), bins, low, high).tolist() == expected.tolist()
    assert figures.histogram_edges(low, high, bins) == pytest.approx(expected_edges.tolist(), abs=0)
    same = np.full(5, 2.0)  # one value: numpy widens the range by 0.5 each side
    expected, expected_edges = np.histogram(same, bins=bins, range=(2.0, 2.0))
    assert figures.histogram(torch.from_numpy(same), bins, 2.0, 2.0).tolist() == expected.tolist()
    assert figures.histogram_edges(2.0, 2.0, bins) == pytest.approx(expected_edges.tolist(), abs=0)


def test_an_epochs_norm_statistics_are_those_of_every_batch():
    diagnostics = Diagnostics(norm_bins=9)
    rng = np.random.default_rng(0)
    batches = [np.abs(rng.normal(5, 1.5, size)).astype(np.float32) for size in (24, 17, 30)]
    for norms in batches:  # one non-zero coordinate per row: its norm is that value exactly
        embeddings = torch.zeros(len(norms), 16)
        embeddings[torch.arange(len(norms)), torch.arange(len(norms)) % 16] = torch.from_numpy(norms)
        diagnostics.on_train_batch_end(None, None, {"embeddings": embeddings}, None, 0)
    trainer = SimpleNamespace(world_size=1, current_epoch=3)
    entry = diagnostics._norm_statistics(trainer, SimpleNamespace(device=torch.device("cpu")))
    every = np.concatenate(batches).astype(np.float64)
    counts, edges = np.histogram(every, bins=9, range=(every.min(), every.max()))
    assert entry["epoch"] == 3 and entry["count"] == len(every)
    assert entry["counts"] == counts.tolist()
    assert entry["edges"] == pytest.approx(edges.tolist(), abs=0)
    assert entry["mean"] == pytest.approx(every.mean(), rel=1e-12)
    assert entry["var"] == pytest.approx(every.var(), rel=1e-9)  # population variance, as SEC's eq. (17)


def test_pca_coordinates_are_numpys_principal_components():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 3.0
    coordinates = figures.pca_2d(torch.from_numpy(points)).numpy()
    centred = points - points.mean(0)
    values, vectors = np.linalg.eigh(np.cov(centred, rowvar=False))
    top = vectors[:, np.argsort(values)[::-1][:2]]
    expected = centred @ top
    for k in range(2):  # a component's sign is arbitrary: ours makes its largest loading positive
        sign = np.sign(top[np.argmax(np.abs(top[:, k])), k])
        np.testing.assert_allclose(coordinates[:, k], sign * expected[:, k], atol=1e-9)


def test_the_hubs_chart_shows_each_hubs_own_image_beside_its_bar(tmp_path):
    """Each hub's image (a colour of its own here) sits in its bar's row, top to bottom in the chart's order."""
    colours = [(230, 20, 20), (20, 200, 20), (20, 20, 230), (200, 200, 20)]
    images = [torch.tensor(c, dtype=torch.uint8)[:, None, None].expand(3, 16, 16) for c in colours]
    counts = [9, 6, 4, 1]
    figure = figures.hubs_figure([f"U+{0x4E00 + i:04X}" for i in range(4)], counts, 50, images)
    figure.savefig(tmp_path / "hubs.png", dpi=100)
    from PIL import Image

    picture = np.asarray(Image.open(tmp_path / "hubs.png").convert("RGB")).astype(int)
    rows = []
    for colour in colours:
        where = np.flatnonzero((np.abs(picture - np.array(colour)).sum(-1) < 30).any(1))
        assert len(where) > 10, f"the picture of colour {colour} is not drawn"
        rows.append(where.mean())
    bar = np.flatnonzero((np.abs(picture - np.array([31, 119, 180])).sum(-1) < 30).sum(1) > 5)  # matplotlib's C0
    segments = np.split(bar, np.flatnonzero(np.diff(bar) > 1) + 1)
    bar_centres = [segment.mean() for segment in segments]
    assert len(bar_centres) == 4
    np.testing.assert_allclose(rows, bar_centres, atol=2)  # the first hub (largest count) on top, each in its row


class _Backbone(nn.Module):
    """Images to a fixed random 8-d embedding (enough to give every class a different score)."""

    def __init__(self, pixels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(pixels, 8)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(images.float().flatten(1) / 255)


@pytest.fixture
def emoji_module(tmp_path):
    """The tiny emoji set (every base image trains), a table with known entries and a model."""
    path = write_emoji_npz(tmp_path / "tiny.npz", n_families=10)
    datamodule = IdentityDataModule(reader="doppel.data.readers.rendered_npz.read_rendered_npz", path=str(path),
                                    base_queries=False)
    datamodule.setup()
    datamodule.seed = 5
    classes = datamodule.num_classes
    table = DoppelgangerTable(classes, top_k=2)
    table.table[:, 0] = torch.tensor([3 if c != 3 else 1 for c in range(classes)])  # class 3: the big hub
    table.table[:, 1] = torch.tensor([(c + 1) % classes for c in range(classes)])
    table.table[[0, 1], 0] = 2  # class 2: the second hub (classes 0 and 1 point to it; class 3 to 1)
    table.table[4, 1] = -1  # a class with one doppelganger only
    torch.manual_seed(0)
    loss_set = LossSet({"l2s": {"_target_": "doppel.losses.prototype.L2Softmax", "weight": 1.0}},
                       embedding_dim=8, num_classes=classes)
    module = DoppelModule(_Backbone(3 * 16 * 16), loss_set, optimizer=None)
    return SimpleNamespace(datamodule=datamodule, table=table, module=module, npz=np.load(path))


def _first_image_in_the_file(npz, name: str) -> np.ndarray:
    identity = list(npz["identity_name"]).index(name)
    return npz["images"][np.flatnonzero(npz["identity"] == identity)[0]]


def test_the_gallery_shows_the_tables_pairs_with_the_datas_pixels_and_the_classifiers_scores(emoji_module):
    datamodule, table, module = emoji_module.datamodule, emoji_module.table, emoji_module.module
    diagnostics = Diagnostics(gallery_hubs=2, gallery_random=3)
    trainer = SimpleNamespace(datamodule=datamodule)
    rows, images = diagnostics.gallery(trainer, module, table)
    names = datamodule.class_names
    assert [(r["class"], r["kind"]) for r in rows[:2]] == [(3, "hub"), (2, "hub")]
    assert [r["pointed_by"] for r in rows[:2]] == [datamodule.num_classes - 3, 2]
    samples = [r["class"] for r in rows if r["kind"] == "sample"]
    assert 1 <= len(samples) <= 3 and not set(samples) & {3, 2}
    assert samples == [r["class"] for r in diagnostics.gallery(trainer, module, table)[0][2:]]  # a fixed sample
    for row in rows:
        assert row["name"] == names[row["class"]]
        expected = [d for d in table.table[row["class"]].tolist() if d >= 0]
        assert [d["class"] for d in row["doppelgangers"]] == expected
        assert [d["name"] for d in row["doppelgangers"]] == [names[d] for d in expected]
    module.eval()
    for row in rows:  # the classifier's scores of the identity's own image
        with torch.no_grad():
            scores = module.loss_set.prototype_term.class_scores(module.backbone(images[row["class"]][None]))[0]
        # abs 1e-5: the gallery scores a batch, this a single image; float32 kernels differ by a few ulps
        assert row["own_score"] == pytest.approx(float(scores[row["class"]]), abs=1e-5)
        assert [d["score"] for d in row["doppelgangers"]] == pytest.approx(
            [float(scores[d["class"]]) for d in row["doppelgangers"]], abs=1e-5)
    # each class's picture is the first of its images in the file, pixel for pixel
    for cls, image in images.items():
        assert np.array_equal(figures.as_picture(image), _first_image_in_the_file(emoji_module.npz, names[cls]))
    tiles = [[(images[r["class"]], r["name"])] + [(images[d["class"]], d["name"]) for d in r["doppelgangers"]]
             for r in rows]
    figure = figures.gallery_figure(tiles, [r["kind"] for r in rows])
    grid = np.asarray(figure.axes).reshape(len(rows), -1)
    for r, row in enumerate(rows):
        shown = [row["class"]] + [d["class"] for d in row["doppelgangers"]]
        for c, cls in enumerate(shown):
            assert np.array_equal(grid[r, c].images[0].get_array(),
                                  _first_image_in_the_file(emoji_module.npz, names[cls]))
            assert grid[r, c].get_title() == names[cls]
        assert all(not grid[r, c].images for c in range(len(shown), grid.shape[1]))  # blank tiles stay blank


def test_the_projection_keeps_whole_families_and_projects_their_normalised_embeddings(emoji_module):
    datamodule = emoji_module.datamodule
    labels = torch.arange(datamodule.num_classes).repeat_interleave(3)
    plain = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(2)) * 4
    split = Embedded(plain, None, labels, torch.zeros_like(labels))
    trainer = SimpleNamespace(datamodule=datamodule)
    coordinates, families = Diagnostics(projection_families=3).projection(trainer, split)
    groups = datamodule.class_groups
    kept = sorted(set(families))
    assert len(kept) == 3
    rows = [i for i, label in enumerate(labels.tolist()) if groups[label] in kept]  # every image of those families
    assert families == [groups[labels[i]] for i in rows]
    expected = figures.pca_2d(torch.nn.functional.normalize(plain[rows], dim=1))
    torch.testing.assert_close(coordinates, expected.float())
    capped, _ = Diagnostics(projection_families=3, projection_points=4).projection(trainer, split)
    assert len(capped) == 4


def test_a_run_writes_its_pictures_and_their_numbers(tmp_path):
    cfg = compose_cfg(tmp_path, ["sampler=doppel", "callbacks.diagnostics.gallery_random=2"], pictures=True)
    train(cfg)
    folder = tmp_path / "diagnostics"
    epochs = cfg.trainer.max_epochs
    for epoch in range(epochs):
        for stem in ("gallery", "hubs", "projection", "precision_coverage"):
            assert (folder / f"{stem}_e{epoch:03d}.png").stat().st_size > 1000
    norms = json.loads((folder / "norms.json").read_text())
    steps, batch = cfg.trainer.limit_train_batches, cfg.sampler.batch_size
    assert [e["epoch"] for e in norms] == list(range(epochs))
    assert all(e["count"] == steps * batch and sum(e["counts"]) == steps * batch for e in norms)
    import csv

    with open(tmp_path / "csv" / "metrics.csv") as f:
        logged = [float(row["embedding/norm_mean"]) for row in csv.DictReader(f) if row["embedding/norm_mean"]]
    assert logged == pytest.approx([e["mean"] for e in norms], rel=1e-6)
    # the last gallery lists the pairs of the table the run ended with
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    table = next(v for k, v in state["callbacks"].items() if "DoppelgangerMining" in k)["table"]
    rows = json.loads((folder / f"gallery_e{epochs - 1:03d}.json").read_text())
    counts = torch.bincount(table[:, 0][table[:, 0] >= 0], minlength=len(table))
    hubs = [r["class"] for r in rows if r["kind"] == "hub"]
    assert [int(counts[c]) for c in hubs] == sorted(counts.tolist(), reverse=True)[:len(hubs)]
    for row in rows:
        assert [d["class"] for d in row["doppelgangers"]] == [d for d in table[row["class"]].tolist() if d >= 0]
    timing = json.loads((folder / "seconds.json").read_text())
    assert [t["epoch"] for t in timing] == list(range(epochs))
    # the run's own report.html shows that last gallery and the final curve, byte for byte
    from tests.test_report import _Page

    page = _Page()
    page.feed((tmp_path / "report.html").read_text())
    assert page.images[f"gallery_e{epochs - 1:03d}"] == (folder / f"gallery_e{epochs - 1:03d}.png").read_bytes()
    assert page.images["precision_coverage"] == (tmp_path / "precision_coverage.png").read_bytes()
    assert page.tables["metrics"][0] == ["metric", tmp_path.name]


@pytest.mark.parametrize("experiment, pictures", [
    ("sec_table3_bundled", {"gallery": False, "projection": True, "recall_at_k": True}),  # no classifier
    ("sec_simclr_bundled", {"gallery": False, "projection": True, "recall_at_k": False}),  # linear probe
    ("sec_table4_bundled", {"gallery": True, "projection": True, "recall_at_k": False}),  # ArcFace, mined
])
def test_every_kind_of_run_gets_the_pictures_it_can_have(tmp_path, experiment, pictures):
    train(compose_cfg(tmp_path, [f"experiment={experiment}", "trainer.max_epochs=1"], pictures=True))
    folder = tmp_path / "diagnostics"
    assert json.loads((folder / "norms.json").read_text())[0]["count"] > 0
    assert (folder / "gallery_e000.png").exists() == pictures["gallery"]
    assert (folder / "projection_e000.png").exists() == pictures["projection"]
    assert (folder / "recall_at_k_e000.png").exists() == pictures["recall_at_k"]
    assert (tmp_path / "report.html").stat().st_size > 10_000


def test_tests_and_users_can_leave_the_pictures_out(tmp_path):
    train(compose_cfg(tmp_path, ["trainer.max_epochs=1"]))
    assert not (tmp_path / "diagnostics").exists() and not (tmp_path / "report.html").exists()
