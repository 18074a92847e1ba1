"""Forward + backward time and peak memory of every loss term against pytorch-metric-learning (PML).

Each (term, implementation) runs in its own process over the batch sizes in ascending order, so peak
memory is that process's own and an out-of-memory in PML does not take the table down. Embeddings are
512-d with 4 examples per class; prototype terms classify into ``--classes`` classes. The two sides use
matched definitions (the ones the parity tests in tests/losses/test_pml_parity.py check), so the ratio
PML time / ours time compares the same loss. Terms PML lacks are timed alone.

    python scripts/bench/losses.py                           # all terms, batch 256 512 1024 4096, CPU
    python scripts/bench/losses.py --terms lifted ntxent --batches 512 --markdown
    python scripts/bench/losses.py --device cuda              # peak memory from the CUDA allocator

On CPU, peak memory is the growth of the process's maximum resident set over its state after import;
``--memory-limit-gb`` caps each process's address space so that an oversized allocation fails fast as
"OOM" instead of swapping the machine.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DIM = 512
PER_CLASS = 4


def ours(name: str, classes: int):
    from doppel.losses import exemplar as E
    from doppel.losses import prototype as P
    from doppel.losses import regularizers as R

    table = {
        "softmax": lambda: P.Softmax(DIM, classes),
        "l2softmax": lambda: P.L2Softmax(DIM, classes),
        "normface": lambda: P.NormFace(DIM, classes, scale=20.0, trainable_scale=False),
        "cosface": lambda: P.CosFace(DIM, classes),
        "arcface": lambda: P.ArcFace(DIM, classes),
        "sphereface": lambda: P.SphereFace(DIM, classes, scale=None, anneal=False),
        "lsoftmax": lambda: P.LargeMarginSoftmax(DIM, classes, anneal=False),
        "center": lambda: P.CenterLoss(DIM, classes),
        "ie": lambda: P.IELoss(DIM, classes, q_fraction=0.2),
        "contrastive": lambda: E.ContrastiveLoss(power=1, reduction="mean_nonzero"),
        "triplet": lambda: E.TripletLoss(reduction="mean_nonzero"),
        "semihard": lambda: E.SemiHardTripletLoss(rule="all"),
        "semihard_facenet": lambda: E.SemiHardTripletLoss(rule="facenet"),
        "npair": lambda: E.NormalizedNPairLoss(25.0),
        "ntxent": lambda: E.NTXentLoss(0.5),
        "ms": lambda: E.MultiSimilarityLoss(),
        "lifted": lambda: E.LiftedStructured(scale=1.0, trainable_scale=False),
        "margin": lambda: E.CosineMarginLoss(),
        "sec": lambda: R.SphericalEmbeddingConstraint(),
        "l2reg": lambda: R.L2Reg(),
    }
    term = table[name]()
    return lambda x, labels: term.to(x.device)(x, labels)


def pml(name: str, classes: int):
    """PML's counterpart with the matched settings, or None where PML has none."""
    from pytorch_metric_learning import losses, miners
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.regularizers import LpRegularizer

    squared = dict(distance=LpDistance(normalize_embeddings=True, p=2, power=2))
    plain = {
        "normface": lambda: losses.NormalizedSoftmaxLoss(classes, DIM, temperature=0.05),
        "cosface": lambda: losses.CosFaceLoss(classes, DIM, margin=0.35, scale=64),
        "arcface": lambda: losses.ArcFaceLoss(classes, DIM, margin=math.degrees(0.45), scale=64),
        "sphereface": lambda: losses.SphereFaceLoss(classes, DIM, margin=3, scale=1),
        "lsoftmax": lambda: losses.LargeMarginSoftmaxLoss(classes, DIM, margin=4, scale=1),
        "contrastive": lambda: losses.ContrastiveLoss(pos_margin=0, neg_margin=1),
        "triplet": lambda: losses.TripletMarginLoss(margin=1.0, **squared),
        "npair": lambda: losses.NTXentLoss(temperature=1 / 25),
        "lifted": lambda: losses.LiftedStructureLoss(neg_margin=1, pos_margin=0),
    }
    mined = {
        "semihard": (lambda: losses.TripletMarginLoss(margin=0.2, **squared),
                     lambda: miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard", **squared)),
        "semihard_facenet": (lambda: losses.TripletMarginLoss(margin=0.2, **squared),
                             lambda: miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard", **squared)),
        "ms": (lambda: losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5),
               lambda: miners.MultiSimilarityMiner(epsilon=0.1)),
    }
    if name in plain:
        loss = plain[name]()
        return lambda x, labels: loss.to(x.device)(x, labels)
    if name in mined:
        loss, miner = (make() for make in mined[name])
        return lambda x, labels: loss.to(x.device)(x, labels, miner(x, labels))
    if name == "ntxent":
        loss = losses.NTXentLoss(temperature=0.5)
        # PML pairs the two views by label: image i's views share label i
        return lambda x, labels: loss(x, _views(len(labels), x.device))
    if name == "l2reg":
        regularizer = LpRegularizer(p=2, power=2)
        return lambda x, labels: regularizer(x)
    return None


def _views(n, device):
    import torch

    return torch.arange(n // 2, device=device).repeat(2)


def make_batch(batch: int, classes: int, name: str, device):
    import torch

    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, DIM, generator=generator).to(device).requires_grad_(True)
    if name == "ntxent":  # two views of batch / 2 images, 4 images per class
        labels = torch.arange(batch // 2) // PER_CLASS
        return x, labels.repeat(2).to(device)
    labels = torch.arange(batch) // PER_CLASS
    labels = labels[torch.randperm(batch, generator=generator)] % classes
    return x, labels.to(device)


def time_calls(fn, x, labels, device, budget_s: float) -> float:
    """Median seconds of forward + backward: one warm-up call, then repeats within the budget."""
    import torch

    def call() -> float:
        x.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x, labels).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = call()
    times = [call()]
    while sum(times) + first < budget_s and len(times) < 200:
        times.append(call())
    return statistics.median(times)


def child(args) -> None:
    """Time one (term, implementation) over the batch sizes; one JSON line per batch."""
    import torch

    torch.manual_seed(0)
    device = torch.device(args.device)
    factory = ours if args.impl == "ours" else pml
    fn = factory(args.term, args.classes)
    if fn is None:
        return
    if device.type == "cpu" and args.memory_limit_gb > 0:
        address_space = _vm_size_bytes() + int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    baseline_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    failed = None
    for batch in args.batches:
        row = {"term": args.term, "impl": args.impl, "batch": batch}
        if failed:
            row["error"] = failed
        else:
            try:
                x, labels = make_batch(batch, args.classes, args.term, device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                seconds = time_calls(fn, x, labels, device, args.budget_s)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated() / 2**20
                else:
                    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kb) / 1024
                row.update(ms=seconds * 1000, peak_mb=peak)
                del x, labels
            except (RuntimeError, MemoryError) as error:
                failed = "OOM" if "memory" in str(error).lower() else f"error: {str(error)[:60]}"
                row["error"] = failed
        print(json.dumps(row), flush=True)


def _vm_size_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


TERMS = ["softmax", "l2softmax", "normface", "cosface", "arcface", "sphereface", "lsoftmax", "center", "ie",
         "contrastive", "triplet", "semihard", "semihard_facenet", "npair", "ntxent", "ms", "lifted", "margin",
         "sec", "l2reg"]


def parent(args) -> None:
    results: dict[tuple[str, str, int], dict] = {}
    for term in args.terms:
        for impl in ("ours", "pml"):
            command = [sys.executable, __file__, "--child", "--term", term, "--impl", impl, "--device", args.device,
                       "--classes", str(args.classes), "--budget-s", str(args.budget_s),
                       "--memory-limit-gb", str(args.memory_limit_gb), "--batches", *map(str, args.batches)]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout_s)
                lines, timed_out = done.stdout.splitlines(), False
                if done.returncode != 0:
                    print(done.stderr[-2000:], file=sys.stderr)
            except subprocess.TimeoutExpired as expired:
                partial = expired.stdout or ""
                lines, timed_out = (partial.decode() if isinstance(partial, bytes) else partial).splitlines(), True
            for line in lines:
                row = json.loads(line)
                results[(row["term"], row["impl"], row["batch"])] = row
            if timed_out:  # the batches the process never reached
                for batch in args.batches:
                    results.setdefault((term, impl, batch), {"error": f"> {args.timeout_s:.0f} s"})
        for batch in args.batches:
            print(_line(term, batch, results, args.markdown), flush=True)


def _cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None:
        return "-"
    return row["error"] if "error" in row else format(row[key], fmt)


def _line(term: str, batch: int, results: dict, markdown: bool) -> str:
    a, b = results.get((term, "ours", batch)), results.get((term, "pml", batch))
    ratio = "-"
    if a and b and "ms" in a and "ms" in b:
        ratio = f"{b['ms'] / a['ms']:.2f}"
    elif a and "ms" in a and b and "error" in b:
        ratio = f"PML {b['error']}"
    cells = [term, str(batch), _cell(a, "ms", ".1f"), _cell(b, "ms", ".1f"), ratio,
             _cell(a, "peak_mb", ".0f"), _cell(b, "peak_mb", ".0f")]
    if markdown:
        return "| " + " | ".join(cells) + " |"
    return f"{cells[0]:<17}{cells[1]:>6}{cells[2]:>11}{cells[3]:>11}{cells[4]:>11}{cells[5]:>9}{cells[6]:>9}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--terms", nargs="+", default=TERMS, choices=TERMS)
    parser.add_argument("--batches", nargs="+", type=int, default=[256, 512, 1024, 4096])
    parser.add_argument("--classes", type=int, default=2048, help="classifier size of the prototype terms")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget-s", type=float, default=2.0, help="timing budget per batch size")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per (term, implementation) process")
    parser.add_argument("--memory-limit-gb", type=float, default=8.0)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--term", help=argparse.SUPPRESS)
    parser.add_argument("--impl", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    args.batches = sorted(args.batches)
    header = ["term", "batch", "ours ms", "PML ms", "PML/ours", "ours MB", "PML MB"]
    if args.markdown:
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    else:
        print(f"{header[0]:<17}{header[1]:>6}{header[2]:>11}{header[3]:>11}{header[4]:>11}{header[5]:>9}"
              f"{header[6]:>9}")
    parent(args)


if __name__ == "__main__":
    main()
