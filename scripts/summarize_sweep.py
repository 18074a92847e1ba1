"""Summarise Hydra multiruns: per setting, the mean of each metric over seeds with its 95% confidence
interval; against a baseline setting, the paired difference (same seeds) with its 95% interval and the
paired t-test's two-sided p-value.

    python scripts/summarize_sweep.py outputs/results/cjk_random outputs/results/cjk_doppel \\
        --group sampler --baseline sampler=random

Reads every job's ``metrics.json`` (and, beside it, an ``eval_metrics.json`` of metrics an ``eval.py`` of its
checkpoint added, which never override the run's own) and ``.hydra/overrides.yaml`` under the given multirun
directories;
jobs that share all overrides except ``seed`` (or only the ``--group`` keys, if given) form one row. An
``eval.py`` job of one checkpoint takes the overrides of the training run that wrote it (its
``ckpt_path`` replaced by them; the job's own overrides win), so evaluation sweeps group and pair by the
training settings and seeds (a training job resumed from its own checkpoint, ``ckpt_path=auto`` or its
``last.ckpt``, keeps its settings):

    python eval.py -m ckpt_path=outputs/results/cjk_random/0/checkpoints/last.ckpt,... \\
        eval=[prototype,classifier_learning] hydra.sweep.dir=outputs/results/cjk_stage2_random

Prints Markdown tables; values in %, the best mean of each column in bold (lowest for a loss or error);
``--wandb PROJECT`` also logs the table to W&B. ``--series KEY`` (repeatable) adds, per row, a per-epoch table of a
value the runs log once an epoch in ``csv/metrics.csv`` (``doppel/lookalike_share``,
``sampler/exposure_cv``, ...): mean ± half width of the 95% interval over seeds, as logged, after each
epoch (counted from 1) or after the ``--epochs`` given.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

import yaml
from scipy import stats

DEFAULT_METRICS = ["test/novel/top1", "test/novel/coverage@0.99", "test/novel/coverage@0.999", "test/novel/recall@1",
                   "test/base/top1", "test/base/coverage@0.99", "test/base/recall@1"]
CONFIDENCE = 0.95
SPREAD = f"mean ± half width of the {CONFIDENCE:.0%} t-interval over seeds"  # what a cell shows

Job = tuple[dict[str, str], dict[str, float], Path]  # overrides, final metrics, job directory


def load_jobs(*sweep_dirs: Path) -> list[Job]:
    jobs = []
    for sweep_dir in sweep_dirs:
        for metrics_file in sorted(Path(sweep_dir).glob("*/metrics.json")):
            settings = read_overrides(metrics_file.parent)
            metrics = json.loads(metrics_file.read_text())
            added = metrics_file.parent / "eval_metrics.json"  # an eval.py of the job's checkpoint, kept beside it
            if added.is_file():
                metrics = {**json.loads(added.read_text()), **metrics}  # the run's own numbers win
            jobs.append((settings, metrics, metrics_file.parent))
    if not jobs:
        raise SystemExit(f"no */metrics.json under {', '.join(map(str, sweep_dirs))}: are they finished multiruns?")
    return jobs


def read_overrides(job_dir: Path) -> dict[str, str]:
    overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
    settings = dict(item.split("=", 1) for item in overrides)
    checkpoint = settings.get("ckpt_path", "")
    if checkpoint == "auto" or (checkpoint and Path(checkpoint).resolve().parent.parent == job_dir.resolve()):
        del settings["ckpt_path"]  # a training run resumed from its own checkpoint: not another setting
        return settings
    if checkpoint and not checkpoint.startswith("["):  # one network (not an ensemble): its training run
        run_dir = Path(checkpoint).parent.parent  # <run>/checkpoints/<file>
        if not (run_dir / ".hydra" / "overrides.yaml").is_file():
            raise SystemExit(f"{job_dir} evaluated {checkpoint}, whose run has no .hydra/overrides.yaml: "
                             "keep the checkpoint in its run directory to summarise by training settings.")
        del settings["ckpt_path"]
        settings = {**read_overrides(run_dir), **settings}
    return settings


def half_width(values: list[float]) -> float | None:
    """Half the width of the t-distribution confidence interval of the mean; None for a single value,
    which has no interval (printing "± 0" would claim a certainty one run cannot give)."""
    if len(values) < 2:
        return None
    return stats.t.ppf((1 + CONFIDENCE) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def with_interval(mean: float, half: float | None, number: str = ".2f") -> str:
    """``mean ± half``, or the mean alone when there is no interval (a single run or pair)."""
    return f"{mean:{number}}" if half is None else f"{mean:{number}} ± {half:{number.lstrip('+')}}"


def paired(baseline: dict[str, float], other: dict[str, float]) -> tuple[float, float | None, float, int]:
    """Mean difference other - baseline over the seeds both have, its interval's half width (None below
    2 pairs), the paired t-test's p-value (nan below 2 pairs or with identical differences) and the
    number of pairs."""
    seeds = sorted(set(baseline) & set(other))
    differences = [other[s] - baseline[s] for s in seeds]
    if len(differences) < 2:
        return (differences[0] if differences else math.nan), None, math.nan, len(differences)
    p = stats.ttest_rel([other[s] for s in seeds], [baseline[s] for s in seeds]).pvalue
    return statistics.mean(differences), half_width(differences), float(p), len(differences)


def group_rows(jobs: list[Job], group: list[str] | None) -> dict[str, list[Job]]:
    rows: dict[str, list[Job]] = {}
    for job in jobs:
        settings = job[0]
        keys = group or sorted(k for k in settings if k != "seed")
        name = ", ".join(f"{k}={settings.get(k, 'default')}" for k in keys) or "default"
        rows.setdefault(name, []).append(job)
    return rows


def by_seed(runs: list[Job], metric: str) -> dict[str, float]:
    """Metric in % per seed (the config's default seed is 0)."""
    return {settings.get("seed", "0"): 100 * values[metric] for settings, values, _ in runs if metric in values}


def p_value_text(p: float) -> str:
    """Three decimals, and "p<0.001" rather than a p of zero."""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def row_statistics(jobs: list[Job], group: list[str] | None,
                   metrics: list[str]) -> dict[str, tuple[int, dict[str, tuple[float, float] | None]]]:
    """Per row: its number of runs and, per metric, (mean, half width of the interval) in %, or None."""
    table = {}
    for name, runs in group_rows(jobs, group).items():
        cells = {}
        for metric in metrics:
            values = list(by_seed(runs, metric).values())
            cells[metric] = (statistics.mean(values), half_width(values)) if values else None
        table[name] = (len(runs), cells)
    return table


def best_rows(table: dict[str, tuple[int, dict]], metric: str, lower: bool = False) -> set[str]:
    """The rows with the best mean of ``metric`` (highest, or lowest when ``lower``); none for one row."""
    means = {name: cells[metric][0] for name, (_, cells) in table.items() if cells[metric] is not None}
    if len(means) < 2:
        return set()
    best = (min if lower else max)(means.values())
    return {name for name, mean in means.items() if mean == best}


def lower_is_better(metric: str) -> bool:
    return "loss" in metric or metric.endswith("error")


def summarize(jobs: list[Job], group: list[str] | None, metrics: list[str], baseline: str | None = None) -> str:
    rows = group_rows(jobs, group)
    table = row_statistics(jobs, group, metrics)
    best = {metric: best_rows(table, metric, lower_is_better(metric)) for metric in metrics}
    header = ["setting", "runs", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, (count, statistics_of) in table.items():
        cells = [name, str(count)]
        for metric in metrics:
            value = statistics_of[metric]
            text = "-" if value is None else with_interval(*value)
            cells.append(f"**{text}**" if name in best[metric] else text)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\n{SPREAD} (the value alone for a single run), in %; the best mean of each column in bold.")
    if baseline is None:
        return "\n".join(lines)
    if baseline not in rows:
        raise SystemExit(f"--baseline {baseline!r} is not a row; rows: {sorted(rows)}")
    lines += ["", f"Paired differences against {baseline} (same seeds):", "",
              "| setting | pairs | " + " | ".join(metrics) + " |", "|" + "---|" * (len(metrics) + 2)]
    for name, runs in rows.items():
        if name == baseline:
            continue
        cells, pairs = [], 0
        for metric in metrics:
            mean, half, p, pairs_here = paired(by_seed(rows[baseline], metric), by_seed(runs, metric))
            pairs = max(pairs, pairs_here)
            if math.isnan(mean):
                cells.append("-")
            elif half is None:
                cells.append(f"{mean:+.2f} (one pair: no test)")
            else:
                cells.append(f"{with_interval(mean, half, '+.2f')} ({p_value_text(p)})")
        lines.append(f"| {name} | {pairs} | " + " | ".join(cells) + " |")
    lines.append(f"\ndifference of the means ± half width of its {CONFIDENCE:.0%} t-interval, in points; "
                 "p: two-sided paired t-test.")
    return "\n".join(lines)


def logged_series(job_dir: Path, key: str) -> dict[int, float]:
    """Epoch, counted from 1 as ``trainer.max_epochs`` counts them -> the value of ``key`` logged in that
    epoch (the last one, if several); the CSV's ``epoch`` column counts from 0."""
    series: dict[int, float] = {}
    with open(job_dir / "csv" / "metrics.csv", newline="") as file:
        for row in csv.DictReader(file):
            if row.get(key):
                series[int(row["epoch"]) + 1] = float(row[key])
    return series


def series_table(jobs: list[Job], group: list[str] | None, key: str, epochs: list[int] | None = None) -> str:
    """Per row, ``key`` after each epoch (or only after ``epochs``, counted from 1)."""
    rows = group_rows(jobs, group)
    per_row = {name: [logged_series(job_dir, key) for _, _, job_dir in runs] for name, runs in rows.items()}
    logged = sorted({epoch for runs in per_row.values() for series in runs for epoch in series})
    if not logged:
        return f"{key}: not logged by these runs."
    if epochs:
        never = sorted(set(epochs) - set(logged))
        if never:
            # Validation keys are logged every few epochs only: name the epochs that exist, not just their range.
            have = " ".join(map(str, logged)) if len(logged) <= 12 else f"{logged[0]}-{logged[-1]}"
            raise SystemExit(f"--epochs {' '.join(map(str, never))}: no run logged {key} after that epoch "
                             f"(logged after epochs {have}); pick epochs from those")
        logged = sorted(set(epochs))
    spread = f"{SPREAD}, as logged" if any(len(runs) > 1 for runs in per_row.values()) else "one run per row, as logged"
    lines = [f"{key} after each epoch ({spread}):",
             "", "| setting | " + " | ".join(f"epoch {e}" for e in logged) + " |", "|" + "---|" * (len(logged) + 1)]
    for name, runs in per_row.items():
        cells = []
        for epoch in logged:
            values = [series[epoch] for series in runs if epoch in series]
            if not values:  # a shorter run, or a key logged only by another row's runs
                cells.append("-")
                continue
            half = half_width(values)
            mean = f"{statistics.mean(values):.4g}"
            cells.append(mean if half is None else f"{mean} ± {half:.2g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def present_metrics(jobs: list[Job]) -> list[str]:
    """The default metrics the jobs have; else every ``test/`` metric of theirs (retrieval, linear probe, ...)."""
    have = set().union(*(values for _, values, _ in jobs))
    chosen = [m for m in DEFAULT_METRICS if m in have]
    return chosen or sorted(m for m in have if m.startswith("test/"))


def log_to_wandb(table: dict[str, tuple[int, dict]], metrics: list[str], project: str, name: str) -> Path:
    """The row statistics as a W&B table (``sweep/summary``) in a run of their own (offline unless
    WANDB_MODE says otherwise); returns the run's folder."""
    import os

    import wandb

    columns = ["setting", "runs"] + [f"{m} {part}" for m in metrics for part in ("mean", "ci95")]
    data = [[row, count] + [v for m in metrics for v in (cells[m] if cells[m] is not None else (None, None))]
            for row, (count, cells) in table.items()]
    run = wandb.init(project=project, name=name, job_type="sweep-summary", mode=os.environ.get("WANDB_MODE", "offline"))
    run.log({"sweep/summary": wandb.Table(columns=columns, data=data)})
    folder = Path(run.dir).parent
    run.finish()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", type=Path, nargs="+")
    parser.add_argument("--group", nargs="*", help="override keys that define a row (default: all but seed)")
    parser.add_argument("--metrics", nargs="*", default=None,
                        help="final metrics to tabulate (default: the prototype protocol's, else every test/ one)")
    parser.add_argument("--baseline", help="the row the others are compared with, e.g. sampler=random")
    parser.add_argument("--series", action="append", default=[], help="a per-epoch logged key to tabulate")
    parser.add_argument("--epochs", type=int, nargs="+", metavar="N",
                        help="the --series tables show only these epochs (counted from 1; default: every epoch)")
    parser.add_argument("--wandb", metavar="PROJECT", help="also log the table to W&B (offline unless WANDB_MODE)")
    args = parser.parse_args()
    jobs = load_jobs(*args.sweep_dirs)
    metrics = args.metrics or present_metrics(jobs)
    print(summarize(jobs, args.group, metrics, args.baseline))
    if args.wandb:
        name = "summary of " + ", ".join(p.name for p in args.sweep_dirs)
        print(f"W&B: {log_to_wandb(row_statistics(jobs, args.group, metrics), metrics, args.wandb, name)}")
    for key in args.series:
        print("\n" + series_table(jobs, args.group, key, args.epochs))


if __name__ == "__main__":
    main()
