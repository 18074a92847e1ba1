"""The classifier at face-recognition scale, on CPU processes (gloo): step time and memory of the full
classifier against ``classifier.sharded=true``, with and without mining and Partial FC, in one run.

Each setting runs in fresh processes (so each peak memory is its own): W processes, a batch of ``--batch``
embeddings per process from a linear layer (the replicated part DDP all-reduces, standing in for the
backbone), ArcFace over ``--classes`` classes, backward, Nesterov SGD with momentum, and (when mining) the
proposals gathered and merged into the table. The full classifier's gradient is all-reduced as DDP does.
Printed: the median step time and its ratio to the full classifier's (and mining on / off, and doppelganger
/ uniform negatives), the classifier's bytes per process (weights + gradient + momentum) next to what the
arithmetic says, and each process's peak resident memory.

    python scripts/bench/scale.py                                  # 100,000 and 1,000,000 classes
    python scripts/bench/scale.py --classes 2000000 --settings sharded --steps 2   # the per-process memory at 2M

The sampler section: CPU per step of each batch sampler at WebFace42M's shape (2M classes x 21 images,
world size 8), the balanced sampler's O(log C) draw against its former O(C) multinomial, in one run:

    python scripts/bench/scale.py --section sampler
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from doppel.losses.loss_set import LossSet
from doppel.losses.sharding import gather_rows
from doppel.module import shard_classifier, sharded_names
from doppel.sampling.doppelganger import DoppelgangerTable, TableUpdate
from doppel.sampling.samplers import (
    BalancedDoppelgangerBatchSampler,
    DoppelgangerBatchSampler,
    IdentityBatchSampler,
    SamplerContext,
)

# name: (sharded, sample_rate, negatives, mining)
SETTINGS = {
    "full": (False, 1.0, "uniform", True),
    "sharded": (True, 1.0, "uniform", True),
    "sharded_no_mining": (True, 1.0, "uniform", False),
    "sharded_pfc0.1": (True, 0.1, "uniform", True),
    "sharded_pfc0.1_doppel": (True, 0.1, "doppel", True),
}


class Model(torch.nn.Module):
    def __init__(self, classes: int, dim: int, sharded: bool, sample_rate: float, negatives: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.neck = torch.nn.Linear(dim, dim)
        self.loss_set = LossSet({"arcface": {"_target_": "doppel.losses.prototype.ArcFace"}}, dim, classes,
                                classifier={"sharded": sharded, "sample_rate": sample_rate, "negatives": negatives})


def _worker(rank: int, world: int, port: int, setting: str, args: argparse.Namespace, folder: str) -> None:
    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    sharded, sample_rate, negatives, mining = SETTINGS[setting]
    model = Model(args.classes, args.dim, sharded, sample_rate, negatives)
    shard_classifier(model, model.loss_set, rank, world)
    own = set(sharded_names(model, model.loss_set))
    replicated = [p for n, p in model.named_parameters() if p.requires_grad and n not in own]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    table = DoppelgangerTable(args.classes)
    table.table[:, 0] = torch.randperm(args.classes, generator=torch.Generator().manual_seed(1))  # a full table
    model.loss_set.read_table(table)
    generator = torch.Generator().manual_seed(100 + rank)
    split = model.loss_set.prototype_term.split()
    times = []
    for step in range(args.steps + 1):  # the first step warms up
        inputs = torch.randn(args.batch, args.dim, generator=generator)
        labels = torch.randint(args.classes, (args.batch,), generator=generator)
        dist.barrier()
        start = time.perf_counter()
        total, _, update = model.loss_set(model.neck(inputs), labels, table.mining if mining else None)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        for param in replicated:  # what DDP does with every replicated gradient
            dist.all_reduce(param.grad)
            param.grad /= world
        optimizer.step()
        if mining:
            stacked = {k: gather_rows(t).view(world, *t.shape) for k, t in vars(update).items()}
            table.apply(TableUpdate.gathered(**stacked, split_classes=split))
        if step:
            times.append(time.perf_counter() - start)
    term = model.loss_set.prototype_term
    weight = term.weight
    classifier_bytes = sum(t.numel() * t.element_size()
                           for t in (weight, weight.grad, optimizer.state[weight]["momentum_buffer"]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.save({"ms": 1e3 * statistics.median(times), "classifier_bytes": classifier_bytes, "peak_rss": peak,
                "rows": weight.shape[0]}, f"{folder}/{setting}_{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(setting: str, args: argparse.Namespace) -> dict[str, float]:
    """One setting in ``args.world`` fresh processes: the slowest process's median step, process 0's bytes."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(args.world, free_port(), setting, args, folder), nprocs=args.world, join=True)
        results = [torch.load(Path(folder) / f"{setting}_{r}.pt", weights_only=True) for r in range(args.world)]
    return {"ms": max(r["ms"] for r in results), "classifier_bytes": results[0]["classifier_bytes"],
            "rows": results[0]["rows"], "peak_rss": max(r["peak_rss"] for r in results)}


def main(argv: list[str] | None = None) -> dict[int, dict[str, dict[str, float]]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128, help="embeddings per process")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--repeats", type=int, default=2, help="rounds over the settings, alternating their order")
    parser.add_argument("--json", help="also write the measurements to this file")
    args = parser.parse_args(argv)
    print(f"CPU, {args.world} processes x {args.threads} thread(s); torch {torch.__version__}; ArcFace, "
          f"{args.batch} x {args.dim} per process; median of {args.steps} steps, mean over {args.repeats} rounds")
    print(f"{'classes':>9} {'setting':<22} {'ms/step':>9} {'vs full':>8} {'classifier MB/process':>22} "
          f"{'arithmetic MB':>14} {'peak RSS MB':>12}")
    table: dict[int, dict[str, dict[str, float]]] = {}
    for classes in args.classes:
        args.classes = classes
        # Forward then backward order (ABBA...): drift in the machine's speed hits every setting alike.
        runs: dict[str, list[dict[str, float]]] = {setting: [] for setting in args.settings}
        for repeat in range(args.repeats):
            for setting in args.settings if repeat % 2 == 0 else reversed(args.settings):
                runs[setting].append(measure(setting, args))
        rows = {setting: {**r[0], "ms": statistics.mean(x["ms"] for x in r),
                          "peak_rss": max(x["peak_rss"] for x in r)} for setting, r in runs.items()}
        table[classes] = rows
        for setting, r in rows.items():
            ratio = r["ms"] / rows["full"]["ms"] if "full" in rows else float("nan")
            # weights, gradient and momentum of this process's rows: fp32, rows x dim each
            arithmetic = 3 * r["rows"] * args.dim * 4
            print(f"{classes:>9} {setting:<22} {r['ms']:>9.1f} {ratio:>8.3f} {r['classifier_bytes'] / 2**20:>22.1f} "
                  f"{arithmetic / 2**20:>14.1f} {r['peak_rss'] / 2**20:>12.0f}")
        if "sharded" in rows and "sharded_no_mining" in rows:
            mining = rows["sharded"]["ms"] / rows["sharded_no_mining"]["ms"]
            print(f"{'':>9} mining overhead under sharding: {mining:.3f}x")
        if "sharded_pfc0.1" in rows and "sharded_pfc0.1_doppel" in rows:
            print(f"{'':>9} doppelganger / uniform negatives: "
                  f"{rows['sharded_pfc0.1_doppel']['ms'] / rows['sharded_pfc0.1']['ms']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1) + "\n")
    return table


class MultinomialBalanced(BalancedDoppelgangerBatchSampler):
    """The balanced sampler's random draw before issue 35: weights over every class and torch.multinomial,
    O(C) per draw (the baseline of the sampler section)."""

    def _random_classes(self, n: int, taken: set[int], generator: torch.Generator) -> list[int]:
        weights = torch.from_numpy(1.0 / (1.0 + self.exposure))
        if taken:
            weights[torch.tensor(sorted(taken))] = 0.0
        chosen = torch.multinomial(weights, n, replacement=False, generator=generator).tolist()
        taken.update(chosen)
        return chosen


SAMPLERS = {"random": IdentityBatchSampler, "doppel": DoppelgangerBatchSampler,
            "doppel_balanced": BalancedDoppelgangerBatchSampler, "doppel_balanced_multinomial": MultinomialBalanced}


def sampler_section(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """CPU per step of each sampler at WebFace42M's shape: every process draws the W sub-batches of a step
    from one stream and keeps its own, so a step costs W sub-batches on each process."""
    parser = argparse.ArgumentParser(description="the sampler section of scale.py")
    parser.add_argument("--section")
    parser.add_argument("--classes", type=int, default=2_000_000)
    parser.add_argument("--images-per-class", type=int, default=21, help="WebFace42M: 42M images / 2M identities")
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128, help="images per process")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    labels = torch.arange(args.classes).repeat_interleave(args.images_per_class)
    table = DoppelgangerTable(args.classes)
    table.table[:, 0] = torch.randperm(args.classes, generator=torch.Generator().manual_seed(0))  # a full table
    print(f"CPU, 1 thread; {args.classes:,} classes x {args.images_per_class} images, world size {args.world}, "
          f"{args.batch} images per process; mean of {args.steps} steps after one")
    rows = {}
    torch.set_num_threads(1)
    for name, kind in SAMPLERS.items():
        start = time.perf_counter()
        sampler = kind(SamplerContext(labels, seed=0, rank=0, world_size=args.world, table=table), args.batch)
        built = time.perf_counter() - start
        batches = iter(sampler)
        next(batches)
        start = time.perf_counter()
        for _ in range(args.steps):
            next(batches)
        rows[name] = {"ms_per_step": (time.perf_counter() - start) / args.steps * 1000, "build_s": built}
        base = rows.get("doppel_balanced_multinomial", rows[name])["ms_per_step"]
        print(f"{name:<28} {rows[name]['ms_per_step']:>9.2f} ms/step  built in {built:.1f} s", flush=True)
    ratio = rows["doppel_balanced"]["ms_per_step"] / base
    print(f"doppel_balanced (Fenwick) / multinomial: {ratio:.4f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    import sys

    if "--section" in sys.argv and sys.argv[sys.argv.index("--section") + 1] == "sampler":
        sampler_section()
    else:
        main()
