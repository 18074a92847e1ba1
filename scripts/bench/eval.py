"""Evaluation speed and memory, ours against the peers, side by side in one run.

Retrieval (Recall@{1,2,4,8}, precision@1, R-precision, MAP@R) on N random 512-d unit embeddings with 4-20
images per class: ``doppel.evaluation.metrics.retrieval_metrics`` against pytorch-metric-learning's
AccuracyCalculator with k = "max_bin_count" (exact MAP@R) and with its default k (every reference), both
with its torch kNN on cosine similarity. Clustering (NMI, F1 from k-means with K = classes): our torch
k-means against scikit-learn's KMeans (n_init=1, same K). Verification: the 10-fold accuracy of 6,000
pairs after embedding. Each measurement runs in a fresh process (so peak memory is its own) under an
address-space cap: a peer that would exhaust the machine reports "out of memory" instead.

    python scripts/bench/eval.py --sizes 10000 30000 60000 --threads 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

LIMIT_GB = 16


def embeddings(n: int, seed: int = 0):
    import torch

    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(4, 21, (n // 4 + 1,), generator=generator)
    labels = torch.repeat_interleave(torch.arange(len(sizes)), sizes)[:n]
    centres = torch.randn(len(sizes), 512, generator=generator)
    points = centres[labels] + 1.5 * torch.randn(n, 512, generator=generator)
    return torch.nn.functional.normalize(points, dim=1), labels


def measure(method: str, n: int, threads: int) -> dict:
    """Run in a child process: build the data, then time ``method`` and report its peak memory beyond
    the data's."""
    import torch

    torch.set_num_threads(threads)
    x, y = embeddings(n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if method == "doppel":
        from doppel.evaluation.metrics import retrieval_metrics

        result = retrieval_metrics(x, y, ks=(1, 2, 4, 8))
        result = {"recall@1": result["recall@1"], "map@r": result["map@r"]}
    elif method.startswith("pml"):
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
        from pytorch_metric_learning.utils.inference import CustomKNN

        k = "max_bin_count" if method == "pml_k_max_bin" else None
        calculator = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
                                        k=k, knn_func=CustomKNN(CosineSimilarity()))
        out = calculator.get_accuracy(x, y)
        result = {"recall@1": out["precision_at_1"], "map@r": out["mean_average_precision_at_r"]}
    elif method == "doppel_kmeans":
        from doppel.evaluation.metrics import clustering_metrics, kmeans

        clusters = kmeans(x, int(y.max()) + 1, torch.Generator().manual_seed(0))
        result = clustering_metrics(y, clusters)
    elif method == "sklearn_kmeans":
        from sklearn.cluster import KMeans

        from doppel.evaluation.metrics import clustering_metrics

        clusters = KMeans(int(y.max()) + 1, n_init=1, random_state=0).fit_predict(x.numpy())
        result = clustering_metrics(y, torch.from_numpy(clusters))
    elif method == "verification":
        from doppel.evaluation.verification import verification_accuracy

        pairs = 6000
        issame = torch.arange(pairs) % 2 == 0
        first, other = x[:pairs], x[pairs:2 * pairs]
        second = torch.where(issame[:, None], first + 0.5 * other, other)
        start = time.perf_counter()  # after the pairs are formed: the metric alone
        result = verification_accuracy(torch.stack([first, second], 1).flatten(0, 1), issame)
    else:
        raise ValueError(method)
    took = time.perf_counter() - start
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
    return {"seconds": took, "peak_gb": peak, "result": {k: round(float(v), 6) for k, v in result.items()}}


def child(method: str, n: int, threads: int, timeout: float) -> dict:
    code = (f"import importlib.util, json, resource;"
            f"resource.setrlimit(resource.RLIMIT_AS, ({LIMIT_GB} * 2**30, {LIMIT_GB} * 2**30));"
            f"spec = importlib.util.spec_from_file_location('bench_eval', {__file__!r});"
            f"bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench);"
            f"print('RESULT' + json.dumps(bench.measure({method!r}, {n}, {threads})))")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"> {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    tail = (done.stderr.strip().splitlines() or ["?"])[-1]
    return {"error": f"out of memory (> {LIMIT_GB} GB)" if "memory" in tail.lower() or done.returncode == -9
            else tail[:80]}


def show(result: dict) -> str:
    if "error" in result:
        return result["error"]
    return f"{result['seconds']:.2f} s, {result['peak_gb']:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000, 60_000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    print("| N | doppel | PML k=max_bin_count | PML default k | speed-up vs PML k=max_bin_count | R@1 / MAP@R equal |")
    print("|---|---|---|---|---|---|")
    for n in args.sizes:
        ours = child("doppel", n, args.threads, args.timeout)
        binned = child("pml_k_max_bin", n, args.threads, args.timeout)
        default = child("pml_default_k", n, args.threads, args.timeout)
        ratio = f"{binned['seconds'] / ours['seconds']:.1f}x" if "error" not in binned and "error" not in ours else "-"
        same = "-" if "error" in binned or "error" in ours else str(
            all(abs(ours["result"][k] - binned["result"][k]) < 1e-5 for k in ours["result"]))
        print(f"| {n:,} | {show(ours)} | {show(binned)} | {show(default)} | {ratio} | {same} |", flush=True)
    n = max(args.sizes)
    ours, theirs = child("doppel_kmeans", n, args.threads, args.timeout), child("sklearn_kmeans", n, args.threads,
                                                                                args.timeout)
    print(f"\nclustering at N = {n:,} (K = classes): doppel k-means {show(ours)} {ours.get('result')}; "
          f"scikit-learn KMeans {show(theirs)} {theirs.get('result')}")
    verification = child("verification", 12_000, args.threads, args.timeout)
    print(f"10-fold verification of 6,000 pairs: {show(verification)}")


if __name__ == "__main__":
    main()
