"""``doppel.report``: the page holds the runs' own numbers, files and differences."""

from __future__ import annotations

import base64
import csv
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from doppel.report import build_report, curve_figure, main, read_log, run_colours


class _Page(HTMLParser):
    """Tables (by id) as rows of cell texts, and every inlined image's bytes by its alt text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, bytes] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images[attrs["alt"]] = base64.b64decode(attrs["src"].split(",", 1)[1])

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._table:
            self.tables[self._table][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _png(path: Path, colour: tuple[int, int, int]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 9, 3), colour, np.uint8)).save(path)
    return path.read_bytes()


def _run(folder: Path, lr: float, top1: float, losses: list[float]) -> Path:
    folder.mkdir(parents=True)
    config = {"seed": 0, "optim": {"_target_": "torch.optim.SGD", "lr": lr},
              "paths": {"output_dir": str(folder)}, "logger": {"csv": {"save_dir": str(folder)}}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.json").write_text(json.dumps({"test/novel/top1": top1, "train/epochs": 2.0}))
    (folder / "csv").mkdir()
    with open(folder / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["epoch", "step", "train/loss", "embedding/norm_mean"])
        writer.writeheader()
        for step, loss in enumerate(losses):
            writer.writerow({"epoch": step // 2, "step": step, "train/loss": loss, "embedding/norm_mean": ""})
        writer.writerow({"epoch": 0, "step": 1, "embedding/norm_mean": 3.5})
    return folder


def test_the_report_shows_each_runs_metrics_files_and_what_their_configs_change(tmp_path):
    a = _run(tmp_path / "sweep" / "0", lr=0.01, top1=0.5, losses=[4.0, 3.0, 2.5, 2.0])
    b = _run(tmp_path / "sweep" / "1", lr=0.1, top1=0.625, losses=[4.5, 3.5, 3.0, 2.75])
    figure_a = _png(a / "precision_coverage.png", (255, 0, 0))
    _png(a / "diagnostics" / "gallery_e000.png", (0, 0, 255))
    gallery_a = _png(a / "diagnostics" / "gallery_e001.png", (0, 255, 0))  # the latest is shown
    page = _Page()
    page.feed(build_report([a, b]))
    assert page.tables["metrics"] == [["metric", "0", "1"], ["test/novel/top1", "0.5000", "0.6250"],
                                      ["train/epochs", "2.0000", "2.0000"]]
    # only what differs, and not the runs' own folders
    assert page.tables["config-diff"] == [["key", "0", "1"], ["optim.lr", "0.01", "0.1"]]
    assert page.images["precision_coverage"] == figure_a
    assert page.images["gallery_e001"] == gallery_a and "gallery_e000" not in page.images
    assert {"training loss", "embedding norms"} <= set(page.images)


def test_a_curve_draws_the_logged_points_of_every_run(tmp_path):
    a = _run(tmp_path / "a", lr=0.01, top1=0.5, losses=[4.0, 3.0, 2.5])
    b = _run(tmp_path / "b", lr=0.1, top1=0.6, losses=[5.0, 1.0])
    logs = {"a": read_log(a), "b": read_log(b)}
    figure = curve_figure("loss", ["train/loss", "embedding/norm_mean", "never/logged"], "step", logs)
    loss_panel, norm_panel = figure.axes  # a key no run logged gets no panel
    assert [(list(line.get_xdata()), list(line.get_ydata())) for line in loss_panel.lines] == [
        ([0.0, 1.0, 2.0], [4.0, 3.0, 2.5]), ([0.0, 1.0], [5.0, 1.0])]
    assert [list(line.get_ydata()) for line in norm_panel.lines] == [[3.5], [3.5]]
    assert curve_figure("none", ["never/logged"], "step", logs) is None


def test_the_command_writes_the_page_and_names_a_folder_that_is_not_a_run(tmp_path, capsys):
    run = _run(tmp_path / "run", lr=0.01, top1=0.5, losses=[1.0])
    main([str(run)])
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run directory nor a multirun"):
        main([str(tmp_path / "empty"), "--out", str(tmp_path / "x.html")])


def test_a_multirun_folder_stands_for_its_jobs_in_job_order(tmp_path):
    sweep = tmp_path / "multirun"
    for job in (0, 2, 10):
        _run(sweep / str(job), lr=0.01 * (job + 1), top1=0.5, losses=[1.0])
    (sweep / "multirun.yaml").write_text("x: 1\n")
    page = _Page()
    page.feed(build_report([sweep]))
    assert page.tables["metrics"][0] == ["metric", "0", "2", "10"]


def _hydra_record(run: Path, job: str, choices: dict, overrides: list[str]) -> None:
    """``.hydra/hydra.yaml`` and ``overrides.yaml`` as Hydra writes them (the keys the report reads)."""
    (run / ".hydra").mkdir(parents=True)
    listed = {"experiment": None, "hydra/launcher": "basic", "paths": "default", **choices}
    hydra = {"hydra": {"run": {"dir": str(run)}, "job": {"name": job, "override_dirname": ""},
                       "runtime": {"choices": dict(reversed(listed.items()))}}}  # Hydra's order: last group first
    (run / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra, sort_keys=False))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


def test_the_first_screen_says_what_ran_not_the_classes_it_built(tmp_path):
    run = _run(tmp_path / "run", lr=0.05, top1=0.5, losses=[1.0])
    _hydra_record(run, "train", {"data": "emoji", "loss": "l2s_mb", "sampler": "auto"},
                  ["data=emoji", "optim.lr=0.05", "data.max_groups=400"])
    (run / "environment.json").write_text(json.dumps({"torch": "2.14.1", "threads": 1, "cpu": "AMD EPYC",
                                                      "cores": 2, "gpu": None, "python": "3.11.7"}))
    text = build_report([run])
    page = _Page()
    page.feed(text)
    assert page.tables["ran"] == [
        ["setting", "value"], ["command", "python train.py data=emoji optim.lr=0.05 data.max_groups=400"],
        ["data", "emoji"], ["loss", "l2s_mb"], ["sampler", "auto"], ["seed", "0"], ["torch", "2.14.1"],
        ["threads", "1"], ["machine", "AMD EPYC (2 cores)"]]
    assert text.index("id='ran'") < text.index("id='metrics'")  # before the metrics: the first screen
    assert "_target_" not in text and "torch.optim.SGD" not in text


def test_several_runs_show_their_commands_and_the_choices_that_differ(tmp_path):
    runs = []
    for job, sampler in enumerate(("random", "doppel")):
        run = _run(tmp_path / "sweep" / str(job), lr=0.01, top1=0.5, losses=[1.0])
        _hydra_record(run, "train", {"data": "cjk", "sampler": sampler}, [f"sampler={sampler}", "seed=0"])
        runs.append(run)
    page = _Page()
    text = build_report(runs)
    page.feed(text)
    assert page.tables["ran"] == [["setting", "0", "1"],
                                  ["command", "python train.py sampler=random seed=0",
                                   "python train.py sampler=doppel seed=0"],
                                  ["sampler", "random", "doppel"]]
    assert "Every run: data: cjk; seed: 0." in text


def test_a_run_has_one_colour_on_every_panel_even_where_another_logged_nothing(tmp_path):
    a = _run(tmp_path / "a", lr=0.01, top1=0.5, losses=[4.0, 3.0])
    b = _run(tmp_path / "b", lr=0.1, top1=0.6, losses=[5.0, 1.0])
    logs = {"a": [r for r in read_log(a) if "embedding/norm_mean" not in r], "b": read_log(b)}
    colours = run_colours(["a", "b"])
    figure = curve_figure("both", ["train/loss", "embedding/norm_mean"], "step", logs, colours)
    loss_panel, norm_panel = figure.axes[:2]
    assert [line.get_color() for line in loss_panel.lines] == [colours["a"], colours["b"]]
    assert [line.get_color() for line in norm_panel.lines] == [colours["b"]]  # b's colour, though a is absent
    assert colours["a"] != colours["b"]
    (legend,) = figure.legends  # one legend for the figure, naming every run drawn
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b"]
    many = run_colours([str(i) for i in range(25)])
    assert len({str(c) for c in many.values()}) == 25
