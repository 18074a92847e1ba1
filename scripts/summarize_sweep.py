"""Summarise a Hydra multirun: mean and standard deviation of each metric per setting, over seeds.

    python scripts/summarize_sweep.py outputs/results/doppel_vs_random --group sampler

Reads every job's ``metrics.json`` and ``.hydra/overrides.yaml``; jobs that share all overrides except
``seed`` (or only the ``--group`` keys, if given) form one row. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

DEFAULT_METRICS = ["test/novel/top1", "test/novel/coverage@0.99", "test/novel/coverage@0.999", "test/novel/recall@1",
                   "test/base/top1", "test/base/recall@1"]


def load_jobs(sweep_dir: Path) -> list[tuple[dict[str, str], dict[str, float]]]:
    jobs = []
    for metrics_file in sorted(sweep_dir.glob("*/metrics.json")):
        overrides = yaml.safe_load((metrics_file.parent / ".hydra" / "overrides.yaml").read_text()) or []
        settings = dict(item.split("=", 1) for item in overrides)
        jobs.append((settings, json.loads(metrics_file.read_text())))
    if not jobs:
        raise SystemExit(f"no */metrics.json under {sweep_dir}: is it a finished multirun directory?")
    return jobs


def summarize(jobs, group: list[str] | None, metrics: list[str]) -> str:
    rows: dict[tuple, list[dict[str, float]]] = {}
    for settings, values in jobs:
        keys = group or sorted(k for k in settings if k != "seed")
        rows.setdefault(tuple((k, settings.get(k, "default")) for k in keys), []).append(values)
    header = ["setting", "runs", *metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, runs in rows.items():
        cells = [", ".join(f"{k}={v}" for k, v in key) or "default", str(len(runs))]
        for metric in metrics:
            values = [100 * run[metric] for run in runs if metric in run]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.2f} ± {spread:.2f}" if values else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--group", nargs="*", help="override keys that define a row (default: all but seed)")
    parser.add_argument("--metrics", nargs="*", default=DEFAULT_METRICS)
    args = parser.parse_args()
    print(summarize(load_jobs(args.sweep_dir), args.group, args.metrics))
    print("\nValues in %: mean ± sample standard deviation over the runs of a row.")


if __name__ == "__main__":
    main()
