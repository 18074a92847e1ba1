"""The default model's training step with torch's thread counts, alone and with a second job beside it.

Each measurement is a fresh process that sets its threads (as ``speed.threads`` does), builds the default
backbone and loss (``python train.py``'s: face_resnet_small, L2-Softmax + cosine Margin, the CJK set's
base-class count) and times doppel-sampled steps (draw, forward, backward, SGD, mining). "Shared" starts two
such processes at once, as two jobs side by side. Printed: median seconds per step and the shared / alone
ratio for each thread count.

    python scripts/bench/threads.py                      # threads 1 and the machine's core count
    python scripts/bench/threads.py --threads 1 2 4 --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(threads: int, steps: int, warmup: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, str(HERE))
    from doppel_overhead import build, step

    from doppel.data.readers.rendered_npz import read_rendered_npz
    from doppel.data.split import split_dataset

    classes = split_dataset(read_rendered_npz(bundled="cjk32.npz", prototype_vendor="noto_sans")).num_classes
    device = torch.device("cpu")
    parts = build(classes, device)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step("doppel", *parts, device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return {"threads": torch.get_num_threads(), "median_s": statistics.median(times), "classes": classes}


def measure(threads: int, jobs: int, steps: int, warmup: int) -> list[dict]:
    """``jobs`` processes started together, each with ``threads`` threads; their results."""
    command = [sys.executable, __file__, "--child", str(threads), "--steps", str(steps), "--warmup", str(warmup)]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env) for _ in range(jobs)]
    results = []
    for process in processes:
        out, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"the measuring process failed (exit {process.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps, args.warmup)))
        return
    import torch

    from doppel.environment import cores_available, cpu_name

    cores = cores_available()
    counts = args.threads or sorted({1, cores})
    print(f"{cpu_name()}, {cores} cores; torch {torch.__version__}; {args.steps} steps after {args.warmup} "
          "(median s/step)")
    print(f"{'threads':>7} {'alone':>9} {'2 jobs':>9} {'2 jobs / alone':>15}")
    for threads in counts:
        alone = measure(threads, 1, args.steps, args.warmup)[0]["median_s"]
        shared = max(r["median_s"] for r in measure(threads, 2, args.steps, args.warmup))
        print(f"{threads:>7} {alone:>9.3f} {shared:>9.3f} {shared / alone:>14.2f}x")


if __name__ == "__main__":
    main()
