"""``python -m doppel.report RUN_DIR [RUN_DIR ...]``: one self-contained HTML page (images inlined, no script,
no network) of one or several runs: what ran (the command, the config groups chosen, torch, threads and
machine), their final metrics, what their configs change, the logged curves (one colour per run on every
panel), the protocols' figures and the diagnostics pictures. A run writes its own ``report.html`` when it
finishes.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from omegaconf import OmegaConf  # noqa: E402

from doppel.run_logs import read_log  # noqa: E402

# Curves drawn when a run logged them: (title, metric keys, x axis).
CURVES = [
    ("training loss", ["train/loss"], "step"),
    ("learning rate", ["train/lr"], "step"),
    ("embedding norms", ["embedding/norm_mean", "embedding/norm_var"], "epoch"),
    ("doppelganger table", ["doppel/table_filled", "doppel/churn", "doppel/from_table", "doppel/lookalike_share"],
     "epoch"),
    ("sampler exposure", ["sampler/exposure_cv", "sampler/exposure_starved"], "epoch"),
]
FIGURES = ["precision_coverage", "classifier_precision_coverage", "roc", "recall_at_k"]  # the protocols' own
DIAGNOSTICS = ["gallery", "hubs", "norms", "projection"]


def series(rows: list[dict[str, float]], key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """The logged points of ``key``: x (``step`` or ``epoch``) and value, in log order."""
    points = [(row[x], row[key]) for row in rows if key in row and x in row]
    return [p[0] for p in points], [p[1] for p in points]


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"dotted.key": value}``."""
    if isinstance(config, dict):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: config}


def config_differences(configs: list[dict[str, Any]], runs: list[Path] | None = None) -> dict[str, list[Any]]:
    """Keys whose value is not the same in every config (missing counts as a value), sorted; a run's own
    folder in a value reads ``<run>`` (every run has its own)."""
    flat = [flatten(c) for c in configs]
    for values, run in zip(flat, runs or []):
        own = str(Path(run).resolve())
        for key, value in values.items():
            if isinstance(value, str) and value.startswith(own):
                values[key] = "<run>" + value[len(own):]
    keys = sorted(set().union(*flat))
    ignored = ("paths.", "hydra.")  # where a run lives is not a setting
    return {k: [f.get(k, "—") for f in flat] for k in keys
            if not k.startswith(ignored) and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1}


def what_ran(run: Path, config: dict[str, Any]) -> dict[str, str]:
    """What a reader asks first: the command (Hydra's record of the run's overrides), each config group's
    choice, the seed and the epochs, and what else decides the numbers (torch, threads, machine)."""
    ran: dict[str, str] = {}
    hydra_file, overrides_file = run / ".hydra" / "hydra.yaml", run / ".hydra" / "overrides.yaml"
    if hydra_file.is_file():
        hydra_cfg = OmegaConf.load(hydra_file).hydra
        overrides = OmegaConf.to_container(OmegaConf.load(overrides_file)) if overrides_file.is_file() else []
        ran["command"] = " ".join([f"python {hydra_cfg.job.name}.py", *overrides])
        # Hydra lists the choices last group first; paths (where runs live) is not a setting
        for group, choice in reversed(OmegaConf.to_container(hydra_cfg.runtime.choices).items()):
            if not group.startswith("hydra") and group != "paths" and choice is not None:
                ran[group] = str(choice)
    flat = flatten(config)
    if not hydra_file.is_file():  # a run made without Hydra's command line (train(cfg) from Python)
        ran.update({k: str(v).rsplit(".", 1)[-1] for k, v in flat.items() if k.endswith("_target_")})
    ran.update({k: str(flat[k]) for k in ("seed", "trainer.max_epochs", "trainer.max_steps") if k in flat})
    if (run / "environment.json").is_file():
        environment = json.loads((run / "environment.json").read_text())
        ran["torch"] = str(environment.get("torch"))
        ran["threads"] = str(environment.get("threads"))
        ran["machine"] = ", ".join(str(environment[k]) for k in ("gpu", "cpu") if environment.get(k)) + \
            f" ({environment.get('cores')} cores)"
    return ran


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return buffer.getvalue()


def run_colours(names: list[str]) -> dict[str, Any]:
    """One colour per run, the same on every panel of the page."""
    if len(names) <= 10:
        return {name: f"C{i}" for i, name in enumerate(names)}
    palette = plt.get_cmap("tab20") if len(names) <= 20 else plt.get_cmap("turbo")
    return {name: palette(i if len(names) <= 20 else i / (len(names) - 1)) for i, name in enumerate(names)}


def curve_figure(title: str, keys: list[str], x: str, logs: dict[str, list[dict[str, float]]],
                 colours: dict[str, Any] | None = None) -> Any | None:
    """One panel per key with a line per run, each run in its colour of ``colours``, and one legend for the
    figure; None when no run logged any of them."""
    drawn = [k for k in keys if any(series(rows, k, x)[0] for rows in logs.values())]
    if not drawn:
        return None
    colours = colours or run_colours(list(logs))
    legend = 1.6 if len(logs) > 1 else 0.0  # inches right of the panels for the runs' names
    figure, axes = plt.subplots(1, len(drawn), figsize=(3.6 * len(drawn) + legend, 2.8), squeeze=False)
    handles = {}
    for panel, key in zip(axes[0], drawn):
        for name, rows in logs.items():
            xs, ys = series(rows, key, x)
            if xs:
                line, = panel.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=name,
                                   color=colours[name])
                handles.setdefault(name, line)
        panel.set(title=key, xlabel=x)
        panel.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0, 1 - 0.95 * legend / figure.get_figwidth(), 1))
    if legend:
        figure.legend(list(handles.values()), list(handles), loc="center right", fontsize=6, frameon=False)
    return figure


def _table(name: str, header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are escaped here."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table id='{name}'><tr>{head}</tr>{body}</table>"


def _image(data: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _latest(folder: Path, stem: str) -> Path | None:
    """``<stem>.png``, else the last of ``<stem>_*.png`` (``final`` after every epoch)."""
    if (folder / f"{stem}.png").is_file():
        return folder / f"{stem}.png"
    found = sorted(folder.glob(f"{stem}_e[0-9]*.png")) + sorted(folder.glob(f"{stem}_final.png"))
    return found[-1] if found else None


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222} table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #bbb;padding:3px 7px;font-size:13px;text-align:right} th{background:#eee}
td:first-child,th:first-child{text-align:left} img{max-width:100%;margin:4px;border:1px solid #ddd}
h2{border-bottom:1px solid #ccc;margin-top:1.5em} .run{display:inline-block;vertical-align:top;margin-right:1em}"""


def _is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() or (folder / "metrics.json").is_file()


def expand_runs(paths: list[Path]) -> list[Path]:
    """Run directories as given; a multirun's folder stands for its jobs (in job order)."""
    runs: list[Path] = []
    for path in map(Path, paths):
        if _is_run(path):
            runs.append(path)
            continue
        jobs = sorted((p for p in path.glob("*") if p.is_dir() and _is_run(p)),
                      key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))
        if not jobs:
            raise FileNotFoundError(f"{path} is neither a run directory nor a multirun's (no config.yaml or "
                                    "metrics.json in it or its subfolders): pass outputs/runs/<time> or "
                                    "outputs/multirun/<time>.")
        runs += jobs
    return runs


def build_report(runs: list[Path], names: list[str] | None = None) -> str:
    """The HTML page of ``runs`` (run directories, or multirun folders for all their jobs)."""
    runs = expand_runs(runs)
    names = names or _names(runs)
    metrics = [json.loads((r / "metrics.json").read_text()) if (r / "metrics.json").is_file() else {} for r in runs]
    configs = [OmegaConf.to_container(OmegaConf.load(r / "config.yaml")) if (r / "config.yaml").is_file() else {}
               for r in runs]
    logs = {name: read_log(run) for name, run in zip(names, runs)}
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Doppel report</title><style>{STYLE}</style>"
             "</head><body>", f"<h1>Doppel report: {len(runs)} run{'s' if len(runs) > 1 else ''}</h1>"]

    ran = [what_ran(run, config) for run, config in zip(runs, configs)]
    if len(runs) == 1:
        if ran[0]:
            parts.append("<h2>What ran</h2>" + _table("ran", ["setting", "value"], [[k, v] for k, v in ran[0].items()]))
    else:
        keys = list(dict.fromkeys(k for r in ran for k in r))
        differing = [k for k in keys if k == "command" or len({r.get(k) for r in ran}) > 1]
        shared = [f"{k}: {ran[0][k]}" for k in keys if k not in differing]
        if differing:
            parts.append("<h2>What ran</h2>" + _table("ran", ["setting", *names],
                                                        [[k, *(r.get(k, "—") for r in ran)] for k in differing]))
        if shared:
            parts.append(f"<p>Every run: {html.escape('; '.join(shared))}.</p>")

    keys = sorted(set().union(*metrics))
    parts.append("<h2>Final metrics</h2>")
    if keys:
        parts.append(_table("metrics", ["metric", *names], [[k, *(_cell(m.get(k, "—")) for m in metrics)]
                                                            for k in keys]))
    else:
        parts.append("<p>No run has finished (no metrics.json).</p>")

    if len(runs) > 1:
        differences = config_differences(configs, runs)
        parts.append("<h2>Config differences</h2>")
        parts.append(_table("config-diff", ["key", *names], [[k, *map(str, v)] for k, v in differences.items()])
                     if differences else "<p>The configs are identical.</p>")

    parts.append("<h2>Curves</h2>")
    colours = run_colours(names)
    for title, curve_keys, x in CURVES:
        figure = curve_figure(title, curve_keys, x, logs, colours)
        if figure is not None:
            parts.append(_image(_png(figure), title))
    validation = sorted({k for rows in logs.values() for row in rows for k in row if k.startswith("val/")})
    if validation:
        figure = curve_figure("validation", validation[:4], "epoch", logs, colours)
        parts.append(_image(_png(figure), "validation"))
    if not any(logs.values()):
        parts.append("<p>No run left a log this page can read (csv/metrics.csv, wandb/*/run-*.wandb or "
                     "tensorboard/ event files).</p>")

    for name, run in zip(names, runs):
        pictures = [_image((run / f"{stem}.png").read_bytes(), stem) for stem in FIGURES
                    if (run / f"{stem}.png").is_file()]
        for stem in DIAGNOSTICS:
            found = _latest(run / "diagnostics", stem)
            if found is not None:
                pictures.append(f"<figure>{_image(found.read_bytes(), found.stem)}<figcaption>{found.name}"
                                "</figcaption></figure>")
        if pictures:  # a run without figures gets no empty section
            parts += [f"<h2>{html.escape(name)}</h2><div class='run'>", *pictures, "</div>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def _names(runs: list[Path]) -> list[str]:
    """Short distinct names: the runs' paths below their common folder."""
    resolved = [r.resolve() for r in runs]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath(resolved))
    return [str(p.relative_to(common)) if p != common else p.name for p in resolved]


def write_report(runs: list[Path], out: Path) -> Path:
    out.write_text(build_report(runs), encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m doppel.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path,
                        help="run directories (outputs/runs/<time>) or multirun folders (outputs/multirun/<time>)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the HTML file (default: <run>/report.html for one run, report.html for several)")
    args = parser.parse_args(argv)
    single = len(args.runs) == 1 and _is_run(args.runs[0])
    out = args.out or (args.runs[0] / "report.html" if single else Path("report.html"))
    print(write_report(args.runs, out))


if __name__ == "__main__":
    main()
