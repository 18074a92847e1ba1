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

The index section: start-up of ``data=recordio`` on a WebFace42M-shaped pack (42M header-only image records
in 2M classes, written vectorised once): the first start, which parses the ``.idx`` and builds the
memory-mapped cache (``data.index_cache=auto``), against ``--ranks`` processes starting together on the
built cache (time and memory each: the reader, the split, the training set's arrays and the sampler, all a
rank does before its first batch):

    python scripts/bench/scale.py --section index --folder /tmp/webface_shape

The eval section: leave-one-out Recall@1 of ``--queries`` random embeddings (512-d, ~21 per class, as
WebFace42M's 1% novel images) on 1 process against ``--worlds`` processes sharing the search (process 0
scores, the others serve its chunks; the metrics must come out equal), and the clustering metrics of that many
images in as many clusters as classes (a sparse table):

    python scripts/bench/scale.py --section eval --queries 40000
    python scripts/bench/scale.py --section eval --queries 420000 --worlds 2   # the spread search alone

The checkpoint section: saving a sharded classifier (ArcFace over ``--classes`` x ``--dim``, weights and
Nesterov momentum, after one step) from ``--world`` processes, the way ``last.ckpt`` is written
(``DoppelModule.on_save_checkpoint``): gathered into process 0, which writes one file
(``checkpoint.class_shards=false``), against each process writing its own rows (the default). Printed: the
stall of a step (from the save's start until every process is done), what process 0 writes, the peak
memory of the processes, and a check that both read back as the same logical tensors:

    python scripts/bench/scale.py --section checkpoint --classes 1000000
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import resource
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from doppel.checkpoint import SHARD_REQUEST, new_shard_folder, read_checkpoint, read_class_rows
from doppel.data.datamodule import IdentityDataModule
from doppel.data.readers.recordio import MAGIC
from doppel.data.split import split_dataset
from doppel.evaluation import knn
from doppel.evaluation.metrics import clustering_metrics, retrieval_metrics
from doppel.losses.loss_set import LossSet
from doppel.losses.sharding import ClassShard, gather_rows
from doppel.module import DoppelModule, shard_classifier, sharded_names
from doppel.sampling.doppelganger import DoppelgangerTable, TableUpdate
from doppel.sampling.samplers import (
    BalancedDoppelgangerBatchSampler,
    DoppelgangerBatchSampler,
    IdentityBatchSampler,
    SamplerContext,
)
from doppel.serialization import atomic_save

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


def decimal_lines(keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """mxnet's ``%d\\t%d\\n`` index lines as bytes, built without a Python loop."""
    def widths(values: np.ndarray) -> np.ndarray:
        return 1 + sum((values >= 10**p).astype(np.int64) for p in range(1, 19))

    key_width, offset_width = widths(keys), widths(offsets)
    ends = np.cumsum(key_width + offset_width + 2)
    starts = ends - (key_width + offset_width + 2)
    text = np.empty(int(ends[-1]), np.uint8)
    for values, width, first in ((keys, key_width, starts), (offsets, offset_width, starts + key_width + 1)):
        for p in range(int(width.max())):
            live = width > p
            text[(first + width - 1 - p)[live]] = 48 + (values[live] // 10**p) % 10
    text[starts + key_width], text[ends - 1] = 9, 10
    return text


IMAGE = np.dtype([("magic", "<u4"), ("length", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"),
                  ("id2", "<u8"), ("jpeg", "<u4")])  # a header-only image record: 4 payload bytes
IDENTITY = np.dtype([("magic", "<u4"), ("length", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"),
                     ("id2", "<u8"), ("start", "<f4"), ("end", "<f4")])  # record 0 and identity records


def write_header_pack(rec_path: Path, classes: int, per_class: int, chunk: int = 1 << 21) -> None:
    """An InsightFace pack laid out as ``write_recordio`` writes it (record 0, images by class, identity
    records; tests/scripts check the bytes are the same), with 4-byte stand-ins for the JPEGs."""
    images = classes * per_class
    first = images + 1
    with open(rec_path, "wb") as rec, open(rec_path.with_suffix(".idx"), "wb") as idx:
        head = np.zeros(1, IDENTITY)
        head[["magic", "length", "flag", "start", "end"]] = (MAGIC, 32, 2, first, first + classes)
        rec.write(head.tobytes())
        idx.write(decimal_lines(np.zeros(1, np.int64), np.zeros(1, np.int64)).tobytes())
        offset = IDENTITY.itemsize
        for low in range(0, images, chunk):
            keys = np.arange(low + 1, min(low + chunk, images) + 1, dtype=np.int64)
            records = np.zeros(len(keys), IMAGE)
            records[["magic", "length", "jpeg"]] = (MAGIC, IMAGE.itemsize - 8, 0xD9FFD8FF)
            records["label"], records["id"] = (keys - 1) // per_class, keys
            rec.write(records.tobytes())
            idx.write(decimal_lines(keys, offset + IMAGE.itemsize * np.arange(len(keys))).tobytes())
            offset += IMAGE.itemsize * len(keys)
        for low in range(0, classes, chunk):
            cls = np.arange(low, min(low + chunk, classes), dtype=np.int64)
            records = np.zeros(len(cls), IDENTITY)
            records[["magic", "length", "flag"]] = (MAGIC, IDENTITY.itemsize - 8, 2)
            records["id"] = first + cls
            records["start"], records["end"] = 1 + cls * per_class, 1 + (cls + 1) * per_class
            rec.write(records.tobytes())
            idx.write(decimal_lines(first + cls, offset + IDENTITY.itemsize * np.arange(len(cls))).tobytes())
            offset += IDENTITY.itemsize * len(cls)


def memory_mb() -> dict[str, float]:
    """This process's peak resident memory (VmHWM: since its exec, unlike ru_maxrss, which a spawned child
    inherits from its parent) and, now, its private memory and the shared file pages other processes map too."""
    fields = {}
    for name in ("status", "smaps_rollup"):
        for line in Path(f"/proc/self/{name}").read_text().splitlines():
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) / 1024
    return {"peak_rss_mb": fields["VmHWM"], "private_mb_at_end": fields["Private_Clean"] + fields["Private_Dirty"],
            "shared_mb_at_end": fields["Shared_Clean"] + fields["Shared_Dirty"]}


def start_rank(rank: int, world: int, root: str | None, index_cache: str, barrier, queue) -> None:
    """What rank ``rank`` does before its first batch, timed phase by phase (``root`` None: nothing, the
    baseline of a process that has only imported what a rank imports)."""
    torch.set_num_threads(1)
    barrier.wait()  # the ranks start together (after their imports), as under torchrun
    if root is None:
        queue.put({"rank": rank, **memory_mb()})
        return
    times, begin, cpu_begin = {}, time.perf_counter(), time.process_time()
    datamodule = IdentityDataModule(reader="doppel.data.readers.recordio.read_recordio", root=root,
                                    index_cache=index_cache, novel_fraction=0.01, base_queries=False)
    datamodule.data = datamodule.read(**datamodule.reader_settings)
    times["read_s"] = time.perf_counter() - begin
    datamodule.split = split_dataset(datamodule.data, 0.01, None, False)
    times["split_s"] = time.perf_counter() - begin - sum(times.values())
    dataset = datamodule._dataset(datamodule.split.training, train=True)
    times["dataset_s"] = time.perf_counter() - begin - sum(times.values())
    sampler = DoppelgangerBatchSampler(SamplerContext(datamodule.split.label[datamodule.split.training], 0, rank,
                                                      world, DoppelgangerTable(datamodule.num_classes)), 128)
    next(iter(sampler))
    times["sampler_s"] = time.perf_counter() - begin - sum(times.values())
    times["total_s"] = time.perf_counter() - begin
    times["cpu_s"] = time.process_time() - cpu_begin  # what it costs without other work on the cores
    queue.put({"rank": rank, **times, "images": len(dataset), "classes": datamodule.num_classes, **memory_mb()})


def start_together(ranks: int, world: int, root: str | None, index_cache: str) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    queue, barrier = context.Queue(), context.Barrier(ranks)
    processes = [context.Process(target=start_rank, args=(r, world, root, index_cache, barrier, queue))
                 for r in range(ranks)]
    for process in processes:
        process.start()
    rows = sorted((queue.get() for _ in processes), key=lambda row: row["rank"])
    for process in processes:
        process.join()
    return rows


def index_section(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description="the index section of scale.py")
    parser.add_argument("--section")
    parser.add_argument("--folder", required=True, help="where the synthetic pack is written (kept for reruns)")
    parser.add_argument("--classes", type=int, default=2_000_000)
    parser.add_argument("--images-per-class", type=int, default=21, help="WebFace42M: 42M images / 2M identities")
    parser.add_argument("--ranks", type=int, default=2, help="processes starting together on the built cache")
    parser.add_argument("--world", type=int, default=8, help="the world size the sampler is built for")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    rec = folder / "train.rec"
    shape = f"{args.classes}x{args.images_per_class}"
    if not rec.exists() or (folder / "shape").read_text() != shape:
        begin = time.perf_counter()
        write_header_pack(rec, args.classes, args.images_per_class)
        (folder / "shape").write_text(shape)
        sizes = [path.stat().st_size / 2**30 for path in (rec, rec.with_suffix(".idx"))]
        print(f"wrote {rec} ({sizes[0]:.2f} GB, .idx {sizes[1]:.2f} GB) in {time.perf_counter() - begin:.0f} s",
              flush=True)
    shutil.rmtree(folder / "train.idx.doppel-cache", ignore_errors=True)
    idle = start_together(1, args.world, None, "off")[0]
    rows = {"first start (builds the cache)": start_together(1, args.world, str(folder), "auto"),
            f"{args.ranks} ranks together on the cache": start_together(args.ranks, args.world, str(folder), "auto")}
    if os.environ.get("SCALE_INDEX_WITHOUT_CACHE"):
        rows["index_cache=off"] = start_together(1, args.world, str(folder), "off")
    first = rows["first start (builds the cache)"][0]
    print(f"{first['images']:,} training images, {first['classes']:,} classes; sampler built for world size "
          f"{args.world}; a process that has only imported: peak RSS {idle['peak_rss_mb']:.0f} MB, private "
          f"{idle['private_mb_at_end']:.0f} MB (in the rows below, less that: the start-up's own)")
    print(f"{'':<34} {'read s':>7} {'split s':>8} {'arrays s':>9} {'sampler s':>10} {'total s':>8} {'CPU s':>6} "
          f"{'peak RSS MB':>12} {'private MB':>11} {'shared MB':>10}")
    for name, ranks in rows.items():
        for row in ranks:
            print(f"{name + ' / rank ' + str(row['rank']):<34} {row['read_s']:>7.2f} {row['split_s']:>8.2f} "
                  f"{row['dataset_s']:>9.2f} {row['sampler_s']:>10.2f} {row['total_s']:>8.2f} {row['cpu_s']:>6.2f} "
                  f"{row['peak_rss_mb'] - idle['peak_rss_mb']:>12.0f} "
                  f"{row['private_mb_at_end'] - idle['private_mb_at_end']:>11.0f} {row['shared_mb_at_end']:>10.0f}")
    together = rows[f"{args.ranks} ranks together on the cache"]
    print(f"start on the cache / first start: {max(r['total_s'] for r in together) / first['total_s']:.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"idle": idle, **rows}, indent=1) + "\n")
    return rows


def _eval_worker(rank: int, world: int, port: int, args: argparse.Namespace, folder: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if rank != 0:
        knn.serve(torch.device("cpu"))
    else:
        generator = torch.Generator().manual_seed(0)
        labels = torch.randint(0, max(1, args.queries // 21), (args.queries,), generator=generator)
        embeddings = torch.nn.functional.normalize(torch.randn(args.queries, args.dim, generator=generator), dim=1)
        begin = time.perf_counter()
        with knn.spread_over_processes(torch.device("cpu")):
            metrics = retrieval_metrics(embeddings, labels, ks=(1,), at_r=False)
        took = time.perf_counter() - begin
        clusters = torch.randint(0, int(labels.max()) + 1, (args.queries,), generator=generator)
        begin = time.perf_counter()
        clustering = clustering_metrics(labels, clusters)
        Path(folder, "eval.json").write_text(json.dumps({"knn_s": took, "recall@1": metrics["recall@1"],
                                                         "clustering_s": time.perf_counter() - begin, **clustering}))
    dist.barrier()
    dist.destroy_process_group()


def eval_section(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description="the eval section of scale.py")
    parser.add_argument("--section")
    parser.add_argument("--queries", type=int, default=420_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2],
                        help="numbers of processes to run it with (the first is the baseline of the ratios)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = {}
    for world in args.worlds:
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_eval_worker, args=(world, free_port(), args, folder), nprocs=world, join=True)
            rows[f"{world} process{'es' if world > 1 else ''}"] = json.loads(Path(folder, "eval.json").read_text())
    print(f"CPU, {args.threads} thread(s) per process; {args.queries:,} queries x {args.dim}, leave-one-out Recall@1")
    base = next(iter(rows.values()))
    for name, row in rows.items():
        print(f"{name:<12} kNN {row['knn_s']:>8.1f} s ({row['knn_s'] / base['knn_s']:.3f}x)  "
              f"recall@1 {row['recall@1']:.6f}  clustering table {row['clustering_s']:.2f} s (NMI {row['nmi']:.4f})")
    if len({row["recall@1"] for row in rows.values()}) != 1:
        raise SystemExit("the processes' Recall@1 differs from one process's: the spread search is wrong")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def _resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


class _PeakResident:
    """The most resident memory seen while the block runs (sampled every millisecond by a thread): a
    process's ru_maxrss also holds the peaks of what ran before."""

    def __enter__(self) -> _PeakResident:
        import threading

        self.peak, self._done = _resident_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _resident_bytes())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, _resident_bytes())


def _bit_sum(tensor: torch.Tensor) -> int:
    """A checksum of a float32 tensor's bits and of its rows' order, exact whatever the order of summation."""
    rows = tensor.detach().contiguous().view(torch.int32).reshape(len(tensor), -1).sum(1, dtype=torch.int64)
    return int(((rows % 1_000_003) * (torch.arange(len(rows)) % 9973 + 1)).sum())


def _checkpoint_worker(rank: int, world: int, port: int, way: str, args: argparse.Namespace, folder: str) -> None:
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    baseline = _resident_bytes()
    model = Model(args.classes, args.dim, True, 1.0, "uniform")
    sgd = functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    module = DoppelModule(model.neck, model.loss_set, optimizer=sgd)
    shard_classifier(module, module.loss_set, rank, world)
    optimizer = module.configure_optimizers()  # the parameter groups (and so the state's order) of training
    for group in optimizer.param_groups:  # the momentum a step leaves, without the step's own transients
        for param in group["params"]:
            optimizer.state[param]["momentum_buffer"] = torch.randn_like(param)
    before = _resident_bytes()
    own = {name: param for name, param in module.named_parameters() if name in sharded_names(module, module.loss_set)}
    classifier = {name: (param, optimizer.state[param]["momentum_buffer"]) for name, param in own.items()}
    classifier_bytes = sum(t.numel() * t.element_size() for pair in classifier.values() for t in pair)
    sums = {name: [_bit_sum(t) for t in pair] for name, pair in classifier.items()}
    path = Path(folder) / "last.ckpt"
    dist.barrier()
    start = time.perf_counter()
    with _PeakResident() as resident:
        checkpoint = {"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()],
                      "global_step": 1}
        if way == "per process":
            checkpoint[SHARD_REQUEST] = new_shard_folder(path, 1)
        module.on_save_checkpoint(checkpoint)
        if rank == 0:
            atomic_save(checkpoint, path)
        del checkpoint
    dist.barrier()  # what Trainer.save_checkpoint ends with: the step waits for the slowest process
    stall = time.perf_counter() - start
    Path(folder, f"save_{rank}.json").write_text(json.dumps({
        "stall_s": stall, "peak": resident.peak, "before": before, "baseline": baseline,
        "classifier_bytes": classifier_bytes, "rows": next(iter(own.values())).shape[0], "sums": sums}))
    dist.destroy_process_group()


def checkpoint_section(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description="the checkpoint section of scale.py")
    parser.add_argument("--section")
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--folder", help="where the checkpoints are written (default: a temporary folder)")
    parser.add_argument("--ways", nargs="+", default=["gathered", "per_process"], choices=["gathered", "per_process"],
                        help="per_process alone where process 0 cannot hold the gathered classifier")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows, same = {}, True
    with tempfile.TemporaryDirectory(dir=args.folder) as parent:
        for key in args.ways:
            way, folder = key.replace("_", " "), Path(parent) / key
            folder.mkdir()
            mp.spawn(_checkpoint_worker, args=(args.world, free_port(), way, args, str(folder)), nprocs=args.world,
                     join=True)
            ranks = [json.loads((folder / f"save_{r}.json").read_text()) for r in range(args.world)]
            files = [p for p in folder.rglob("*.pt")]
            rows[way] = {"stall_s": max(r["stall_s"] for r in ranks),
                         "save_peak_0": max(0, ranks[0]["peak"] - ranks[0]["before"]),  # 0: never above before
                         "save_peak_max": max(max(0, r["peak"] - r["before"]) for r in ranks),
                         "held_before": max(r["before"] - r["baseline"] for r in ranks),
                         "classifier_bytes": max(r["classifier_bytes"] for r in ranks),
                         "rows": max(r["rows"] for r in ranks),
                         "file_mb": (folder / "last.ckpt").stat().st_size / 2**20,
                         "largest_shard_mb": max((p.stat().st_size for p in files), default=0) / 2**20}
            # What was saved reads back: each process's rows (weights, momentum), bit for bit.
            logical = read_class_rows(read_checkpoint(folder / "last.ckpt"))
            momenta = [s["momentum_buffer"] for s in logical["optimizer_states"][0]["state"].values()
                       if s["momentum_buffer"].shape[0] == args.classes]
            bounds = ClassShard.bounds(args.classes, args.world)
            for r, ranked in enumerate(ranks):
                for name, (weight_sum, momentum_sum) in ranked["sums"].items():
                    lo, hi = bounds[r], bounds[r + 1]
                    same &= _bit_sum(logical["state_dict"][name][lo:hi]) == weight_sum
                    same &= _bit_sum(momenta[0][lo:hi]) == momentum_sum
            del logical, momenta
    print(f"CPU, {args.world} processes x {args.threads} thread(s); ArcFace {args.classes:,} x {args.dim}, weights and "
          f"momentum ({2 * args.classes * args.dim * 4 / 2**20:,.0f} MB)")
    print(f"{'classifier saved':<18} {'stall s':>8} {'vs gathered':>12} {'last.ckpt MB':>13} {'largest shard MB':>17} "
          f"{'save peak MB p0':>16} {'save peak MB max':>17}")
    base = rows["gathered"]["stall_s"] if "gathered" in rows else float("nan")
    for way, row in rows.items():
        shard = f"{row['largest_shard_mb']:.1f}" if row["largest_shard_mb"] else "-"
        print(f"{way:<18} {row['stall_s']:>8.2f} {row['stall_s'] / base:>12.3f} {row['file_mb']:>13.1f} {shard:>17} "
              f"{row['save_peak_0'] / 2**20:>16.0f} {row['save_peak_max'] / 2**20:>17.0f}")
    row = next(iter(rows.values()))
    print(f"classifier per process: {row['classifier_bytes'] / 2**20:,.1f} MB of weights and momentum counted from the "
          f"tensors, {2 * row['rows'] * args.dim * 4 / 2**20:,.1f} MB by the arithmetic (2 x {row['rows']:,} rows x "
          f"{args.dim} x 4 bytes); {row['held_before'] / 2**20:,.0f} MB resident for the model before saving")
    print("save peak: the most a process held while saving beyond what it held before")
    print(f"every process's rows read back as saved: {same}")
    if not same:
        raise SystemExit("the saved checkpoint does not read back as the processes held it")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    import sys

    section = sys.argv[sys.argv.index("--section") + 1] if "--section" in sys.argv else None
    if section == "sampler":
        sampler_section()
    elif section == "index":
        index_section()
    elif section == "eval":
        eval_section()
    elif section == "checkpoint":
        checkpoint_section()
    else:
        main()
