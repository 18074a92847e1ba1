"""Training-step time of doppelganger sampling + mining over random sampling, measured in one run.

A step is: draw a batch from the sampler, forward the default backbone, L2-Softmax + cosine Margin
loss, backward, SGD update, and (doppel only) propose + apply the table update from the logits the
loss already computed. Random sampling runs without mining. The two are timed in alternating blocks
so machine noise hits both alike; the ratio of median step times is printed for each class count.

    python scripts/bench/doppel_overhead.py                      # emoji class count and 100,000
    python scripts/bench/doppel_overhead.py --classes 3000 --steps 40 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from doppel.data.readers.rendered_npz import read_rendered_npz
from doppel.data.split import split_dataset
from doppel.losses.loss_set import LossSet
from doppel.sampling.doppelganger import DoppelgangerTable
from doppel.sampling.samplers import DoppelgangerBatchSampler, IdentityBatchSampler, SamplerContext
from doppel.train import CONFIG_DIR


def emoji_class_count() -> int:
    return split_dataset(read_rendered_npz()).num_classes


def build(num_classes: int, device: torch.device, images_per_class: int = 3):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train")
    backbone = instantiate(cfg.backbone, image_size=32).to(device)
    loss_set = LossSet(cfg.loss.terms, backbone.embedding_dim, num_classes).to(device)
    params = list(backbone.parameters()) + list(loss_set.parameters())
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, weight_decay=5e-4)
    labels = torch.arange(num_classes).repeat_interleave(images_per_class)
    images = torch.randint(0, 256, (len(labels), 3, 32, 32), dtype=torch.uint8)
    table = DoppelgangerTable(num_classes)
    samplers = {
        "random": IdentityBatchSampler(SamplerContext(labels), cfg.sampler.batch_size, [2, 4], batches_per_epoch=10**9),
        "doppel": DoppelgangerBatchSampler(SamplerContext(labels, table=table), cfg.sampler.batch_size,
                                           random_ratio=1 / 3, examples_per_class=[2, 4], batches_per_epoch=10**9),
    }
    return backbone, loss_set, optimizer, images, labels, table, {k: iter(s) for k, s in samplers.items()}


def step(kind, backbone, loss_set, optimizer, images, labels, table, batches, device):
    index = torch.tensor(next(batches[kind]))
    x = images[index].to(device, non_blocking=True)
    y = labels[index].to(device, non_blocking=True)
    loss, _, proposals = loss_set(backbone(x), y, table.mining if kind == "doppel" else None)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if kind == "doppel":
        table.apply(proposals)
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(num_classes: int, steps: int, block: int, device: torch.device) -> dict[str, float]:
    parts = build(num_classes, device)
    for kind in ("random", "doppel"):  # warm-up, and a filled table for the doppel sampler
        for _ in range(max(3, num_classes // 27 if num_classes <= 5000 else 3)):
            step(kind, *parts, device)
    times: dict[str, list[float]] = {"random": [], "doppel": []}
    order = ["random", "doppel"]
    while len(times["doppel"]) < steps:
        for kind in order:
            for _ in range(block):
                start = time.perf_counter()
                step(kind, *parts, device)
                times[kind].append(time.perf_counter() - start)
        order.reverse()
    table = parts[5]
    return {"random_ms": 1e3 * statistics.median(times["random"]),
            "doppel_ms": 1e3 * statistics.median(times["doppel"]),
            "filled": table.filled_fraction()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="*", help="class counts (default: emoji count, 100000)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per sampler and class count")
    parser.add_argument("--block", type=int, default=5, help="consecutive steps of one kind")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    counts = args.classes or [emoji_class_count(), 100_000]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; batch 81, face_resnet_small, loss l2s_mb")
    print(f"{'classes':>8} {'random ms':>10} {'doppel ms':>10} {'ratio':>7} {'table filled':>13}")
    for n in counts:
        r = measure(n, args.steps, args.block, device)
        print(f"{n:>8} {r['random_ms']:>10.1f} {r['doppel_ms']:>10.1f} {r['doppel_ms'] / r['random_ms']:>7.3f} "
              f"{r['filled']:>13.2f}")


if __name__ == "__main__":
    main()
