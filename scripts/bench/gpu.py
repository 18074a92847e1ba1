"""The device check: training throughput of the face recipe on one GPU, one command, a few minutes.

ResNet50-IR (``backbone=resnet50_ir``) with ArcFace at 112x112, a batch of 256, bfloat16 autocast and
channels_last, through :meth:`DoppelModule.training_step` (augmentation, backbone, loss, mining proposals),
backward, Nesterov SGD and the table update, in these settings (each against the first, in one run):

- ``pfc0.1_100k``: Partial FC (``classifier.sample_rate=0.1``) over 100,000 classes, the table mined
- ``no_table``: the same without mining (their ratio is the mining overhead)
- ``compile``: the same with ``speed.compile`` (the backbone compiled)
- ``pfc0.1_1m``: 1,000,000 classes
- ``full_100k``: the full classifier (``sample_rate=1``) over 100,000 classes
- ``decode_gpu``: ``data.decode=gpu``: each step first decodes the batch's JPEG bytes (synthetic 112x112
  faces) with nvJPEG

Printed per setting: images/s, its ratio to the first, peak device memory, and host syncs per step (on a
GPU ``torch.cuda.set_sync_debug_mode("warn")`` reports each; on the CPU :class:`HostSyncCounter` counts the
calls that would be one).

    python scripts/bench/gpu.py                                    # on the GPU (about 3 minutes on an H100)
    python scripts/bench/gpu.py --device cpu --backbone face_resnet --image-size 32 --batch 8 --classes 64 \\
        --large-classes 128 --steps 2 --warmup 1 --precision fp32 --settings pfc0.1_100k,no_table     # a CPU try
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
import warnings

import numpy as np
import torch
from PIL import Image

from doppel.data.device_decode import EncodedBatch, decode_batch
from doppel.data.transforms import ImageTransform, PaperAugment
from doppel.host_syncs import HostSyncCounter
from doppel.losses.loss_set import LossSet
from doppel.models import get_backbone
from doppel.module import DoppelModule
from doppel.sampling.doppelganger import DoppelgangerTable

# name: (classes: "base" or "large", sample_rate, mining, compile, decode on the device)
SETTINGS = {
    "pfc0.1_100k": ("base", 0.1, True, False, False),
    "no_table": ("base", 0.1, False, False, False),
    "compile": ("base", 0.1, True, True, False),
    "pfc0.1_1m": ("large", 0.1, True, False, False),
    "full_100k": ("base", 1.0, True, False, False),
    "decode_gpu": ("base", 0.1, True, False, True),
}


def synthetic_jpegs(count: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` distinct size x size JPEGs (quality 95) of smooth noise, as uint8 byte tensors."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=95)
        out.append(torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8))
    return out


class Step:
    """One training step of the recipe, as a run takes it (no Lightning loop around it)."""

    def __init__(self, setting: str, args: argparse.Namespace, device: torch.device) -> None:
        size, rate, self.mining, compiled, self.decode = SETTINGS[setting]
        classes = args.classes if size == "base" else args.large_classes
        torch.manual_seed(0)
        backbone = get_backbone(args.backbone, input_size=args.image_size, **json.loads(args.options))
        if device.type == "cuda":
            backbone.to_channels_last()
        if compiled:
            backbone.compile(backend=args.compile_backend)
        negatives = "doppel" if self.mining else "uniform"
        loss_set = LossSet({"arcface": {"_target_": "doppel.losses.prototype.ArcFace"}}, backbone.embedding_dim,
                           classes, classifier={"sample_rate": rate, "negatives": negatives})
        self.table = DoppelgangerTable(classes)
        if self.mining:
            loss_set.read_table(self.table)
        self.module = DoppelModule(backbone, loss_set, None, augment=PaperAugment(),
                                   mining=self.table.mining if self.mining else None).to(device)
        self.table.to_(device)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                                         weight_decay=5e-4)
        self.device, self.bf16 = device, args.precision == "bf16"
        generator = torch.Generator().manual_seed(1)
        self.batches = [(torch.randint(0, 256, (args.batch, 3, args.image_size, args.image_size), dtype=torch.uint8,
                                       generator=generator).to(device),
                         torch.randint(0, classes, (args.batch,), generator=generator).to(device)) for _ in range(4)]
        self.jpegs = synthetic_jpegs(args.batch, args.image_size) if self.decode else None
        self.transform = ImageTransform()
        self.calls = 0

    def __call__(self) -> None:
        images, labels = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        if self.decode:  # what data.decode=gpu does after the transfer
            images = decode_batch(EncodedBatch(self.jpegs, [None] * len(self.jpegs), [""] * len(self.jpegs)),
                                  self.transform, self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.module.training_step((images, labels), 0)
        out["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if out["proposals"] is not None:
            self.table.apply(out["proposals"])


@contextlib.contextmanager
def count_syncs(device: torch.device, found: list[int]):
    """Appends the number of host syncs made inside the block to ``found``."""
    if device.type == "cuda":
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            finally:
                torch.cuda.set_sync_debug_mode("default")
        found.append(sum("synchroniz" in str(w.message) for w in caught))
    else:
        with HostSyncCounter() as counter:
            yield
        found.append(counter.total)


def measure(setting: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    step = Step(setting, args, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a trainer
        for _ in range(args.warmup):
            step()
        synchronize()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        syncs: list[int] = []
        for _ in range(args.sync_steps):  # steady state, counted apart from the timed steps
            with count_syncs(device, syncs):
                step()
        synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        synchronize()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"images_per_s": args.batch * args.steps / seconds, "peak_gib": peak,
            "syncs_per_step": sum(syncs) / max(1, len(syncs))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backbone", default="resnet50_ir")
    parser.add_argument("--options", default="{}", help="the backbone's options, as JSON")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=100_000)
    parser.add_argument("--large-classes", type=int, default=1_000_000)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sync-steps", type=int, default=3, help="steady-state steps whose host syncs are counted")
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    device = torch.device(args.device)
    names = args.settings.split(",")
    if unknown := [n for n in names if n not in SETTINGS]:
        parser.error(f"unknown settings {unknown}; known: {', '.join(SETTINGS)}")
    described = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{described}, torch {torch.__version__}: {args.backbone} at {args.image_size}x{args.image_size}, batch "
          f"{args.batch}, {args.precision}{', channels_last' if device.type == 'cuda' else ''}")
    rows = {}
    for name in names:
        rows[name] = measure(name, args, device)
        base = rows[names[0]]["images_per_s"]
        row = rows[name]
        print(f"{name:<14} {row['images_per_s']:>9.1f} images/s  {row['images_per_s'] / base:>5.3f}x  "
              f"peak {row['peak_gib']:>6.2f} GiB  {row['syncs_per_step']:.1f} syncs/step", flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"device": described, "rows": rows, "settings": vars(args)}, file, indent=1)


if __name__ == "__main__":
    main()
