"""Training throughput (forward + backward, images/s) of every backbone at its paper input size.

For each backbone, the settings are timed in the same process, alternating in rounds so machine noise
hits them alike; each row's ratio is against that backbone's float32 eager baseline:

- ``fp32``: float32, NCHW, eager (the baseline)
- ``channels_last``: NHWC weights and inputs
- ``bf16+cl``: bfloat16 autocast + channels_last (loss-free: the embedding's sum is backpropagated)
- ``bf16+cl+compile``: the same under ``torch.compile`` (``--compile``; minutes of compilation per
  network on CPU)

    python scripts/bench/backbones.py                                  # CPU, every backbone
    python scripts/bench/backbones.py --device cuda --batch 256 --compile --markdown
    python scripts/bench/backbones.py --backbones resnet50_ir --device cuda --batch 512 --compile

One step is a training step of the network alone: forward, sum of the embedding, backward, and
zeroing of the gradients (the optimizer's update is not included). Images are random 0-255 RGB at the
paper's input size; the backbone's own preprocessing (normalisation) is included.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from doppel.models import BACKBONES, get_backbone

SETTINGS = ("fp32", "channels_last", "bf16+cl", "bf16+cl+compile")


def build(name: str, setting: str, device: torch.device, timm_model: str) -> torch.nn.Module:
    options = {"model": timm_model} if name == "timm" else {}
    net = get_backbone(name, **options).to(device).train()
    if setting != "fp32":
        net.to_channels_last()
    if setting.endswith("compile"):
        net.compile()
    return net


def step(net: torch.nn.Module, images: torch.Tensor, setting: str) -> None:
    autocast = (torch.autocast(images.device.type, dtype=torch.bfloat16) if setting.startswith("bf16")
                else contextlib.nullcontext())
    with autocast:
        out = net(images)
    out.float().sum().backward()
    for p in net.parameters():
        p.grad = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, settings: list[str], batch: int, device: torch.device, rounds: int, steps: int,
            timm_model: str = "resnet50") -> dict[str, float]:
    """Median images/s per setting over ``rounds`` alternating rounds of ``steps`` steps each."""
    h, w = BACKBONES[name].input_size
    images = (torch.rand(batch, 3, h, w, device=device) * 255)
    nets = {s: build(name, s, device, timm_model) for s in settings}
    for s in settings:  # warm-up (and compilation)
        step(nets[s], images, s)
        step(nets[s], images, s)
    synchronize(device)
    rates: dict[str, list[float]] = {s: [] for s in settings}
    for _ in range(rounds):
        for s in settings:
            start = time.perf_counter()
            for _ in range(steps):
                step(nets[s], images, s)
            synchronize(device)
            rates[s].append(batch * steps / (time.perf_counter() - start))
    return {s: statistics.median(r) for s, r in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=[b for b in BACKBONES if b != "ie_cnn_mnist_2d"],
                        choices=sorted(BACKBONES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 128 on GPU")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="steps per round and setting")
    parser.add_argument("--compile", action="store_true", help="also time bf16+cl under torch.compile")
    parser.add_argument("--timm-model", default="resnet50", help="the model of backbone=timm")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()

    device = torch.device(args.device)
    batch = args.batch or (128 if device.type == "cuda" else 8)
    settings = list(SETTINGS if args.compile else SETTINGS[:-1])
    name_of = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"# {name_of}, torch {torch.__version__}, batch {batch}, images/s (forward + backward)")
    header = ["backbone", "input", *settings, *(f"{s} / fp32" for s in settings[1:])]
    print("| " + " | ".join(header) + " |" if args.markdown else "  ".join(header))
    if args.markdown:
        print("|" + "---|" * len(header))
    for name in args.backbones:
        rates = measure(name, settings, batch, device, args.rounds, args.steps, args.timm_model)
        h, w = BACKBONES[name].input_size
        label = f"timm:{args.timm_model}" if name == "timm" else name
        cells = [label, f"{h}x{w}", *(f"{rates[s]:.1f}" for s in settings),
                 *(f"{rates[s] / rates['fp32']:.2f}" for s in settings[1:])]
        print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
