"""Summarise Hydra multiruns: per setting, the mean of each metric over seeds with its 95% confidence
interval; against a baseline setting, the paired difference (same seeds) with its 95% interval and the
paired t-test's two-sided p-value.

    python scripts/summarize_sweep.py outputs/results/cjk_random outputs/results/cjk_doppel \\
        --group sampler --baseline sampler=random

Reads every job's ``metrics.json`` and ``.hydra/overrides.yaml`` under the given multirun directories;
jobs that share all overrides except ``seed`` (or only the ``--group`` keys, if given) form one row. An
``eval.py`` job of one checkpoint takes the overrides of the training run that wrote it (its
``ckpt_path`` replaced by them; the job's own overrides win), so evaluation sweeps group and pair by the
training settings and seeds (a training job resumed from its own checkpoint, ``ckpt_path=auto`` or its
``last.ckpt``, keeps its settings):

    python eval.py -m ckpt_path=outputs/results/cjk_random/0/checkpoints/last.ckpt,... \\
        eval=[prototype,classifier_learning] hydra.sweep.dir=outputs/results/cjk_stage2_random

Prints Markdown tables; values in %. ``--series KEY`` (repeatable) adds, per row, a per-epoch table of a
value the runs log once an epoch in ``csv/metrics.csv`` (``doppel/lookalike_share``,
``sampler/exposure_cv``, ...): mean ± half width of the 95% interval over seeds, as logged.
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

Job = tuple[dict[str, str], dict[str, float], Path]  # overrides, final metrics, job directory


def load_jobs(*sweep_dirs: Path) -> list[Job]:
    jobs = []
    for sweep_dir in sweep_dirs:
        for metrics_file in sorted(Path(sweep_dir).glob("*/metrics.json")):
            settings = read_overrides(metrics_file.parent)
            jobs.append((settings, json.loads(metrics_file.read_text()), metrics_file.parent))
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


def half_width(values: list[float]) -> float:
    """Half the width of the t-distribution confidence interval of the mean (0 for a single value)."""
    if len(values) < 2:
        return 0.0
    return stats.t.ppf((1 + CONFIDENCE) / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))


def paired(baseline: dict[str, float], other: dict[str, float]) -> tuple[float, float, float, int]:
    """Mean difference other - baseline over the seeds both have, its interval's half width, the paired
    t-test's p-value (nan below 2 pairs or with identical differences) and the number of pairs."""
    seeds = sorted(set(baseline) & set(other))
    differences = [other[s] - baseline[s] for s in seeds]
    if len(differences) < 2:
        return (differences[0] if differences else math.nan), math.nan, math.nan, len(differences)
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


def summarize(jobs: list[Job], group: list[str] | None, metrics: list[str], baseline: str | None = None) -> str:
    rows = group_rows(jobs, group)
    header = ["setting", "runs", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in rows.items():
        cells = [name, str(len(runs))]
        for metric in metrics:
            values = list(by_seed(runs, metric).values())
            cells.append(f"{statistics.mean(values):.2f} ± {half_width(values):.2f}" if values else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nmean ± half width of the {CONFIDENCE:.0%} t-interval over seeds, in %.")
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
            cells.append("-" if math.isnan(mean) else f"{mean:+.2f} ± {half:.2f} ({p_value_text(p)})")
        lines.append(f"| {name} | {pairs} | " + " | ".join(cells) + " |")
    lines.append(f"\ndifference of the means ± half width of its {CONFIDENCE:.0%} t-interval, in points; "
                 "p: two-sided paired t-test.")
    return "\n".join(lines)


def logged_series(job_dir: Path, key: str) -> dict[int, float]:
    """Epoch -> the value of ``key`` logged in that epoch (the last one, if several)."""
    series: dict[int, float] = {}
    with open(job_dir / "csv" / "metrics.csv", newline="") as file:
        for row in csv.DictReader(file):
            if row.get(key):
                series[int(row["epoch"])] = float(row[key])
    return series


def series_table(jobs: list[Job], group: list[str] | None, key: str) -> str:
    rows = group_rows(jobs, group)
    per_row = {name: [logged_series(job_dir, key) for _, _, job_dir in runs] for name, runs in rows.items()}
    epochs = sorted({epoch for runs in per_row.values() for series in runs for epoch in series})
    lines = [f"{key} per epoch (mean ± half width of the {CONFIDENCE:.0%} t-interval over seeds, as logged):", "",
             "| setting | " + " | ".join(f"epoch {e}" for e in epochs) + " |", "|" + "---|" * (len(epochs) + 1)]
    for name, runs in per_row.items():
        cells = []
        for epoch in epochs:
            values = [series[epoch] for series in runs if epoch in series]
            cells.append(f"{statistics.mean(values):.4g} ± {half_width(values):.2g}" if values else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", type=Path, nargs="+")
    parser.add_argument("--group", nargs="*", help="override keys that define a row (default: all but seed)")
    parser.add_argument("--metrics", nargs="*", default=DEFAULT_METRICS)
    parser.add_argument("--baseline", help="the row the others are compared with, e.g. sampler=random")
    parser.add_argument("--series", action="append", default=[], help="a per-epoch logged key to tabulate")
    args = parser.parse_args()
    jobs = load_jobs(*args.sweep_dirs)
    print(summarize(jobs, args.group, args.metrics, args.baseline))
    for key in args.series:
        print("\n" + series_table(jobs, args.group, key))


if __name__ == "__main__":
    main()
