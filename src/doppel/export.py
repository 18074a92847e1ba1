"""``export(cfg)``: a checkpoint's network (or an external backbone, as ``eval.py`` takes it) as ONNX or
TorchScript for a serving runtime (``python export.py ckpt_path=... format=onnx``).

The exported graph is the network after its preprocessing: it takes float32 [batch, channels, H, W] (any
batch) already resized and normalised, and gives the embedding (not normalised: compare L2-normalised
embeddings by their dot product). How to make its input is written into the file: ONNX metadata properties
(``doppel.*``), TorchScript extra file ``doppel.json``: input size, channels and their order (rgb, bgr or
luma), the scale applied to 0-255 pixels, mean and std, the embedding dimension, whether the run fused the
mirror's embedding. At export the file is loaded back (onnxruntime, ``torch.jit.load``) and run on real images
of the data config against the PyTorch network; the largest difference of the normalised embeddings is
printed and must stay within ``tolerance``.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from doppel.embed import resolve_flip
from doppel.evaluate import one_network

FORMATS = {"onnx": "model.onnx", "torchscript": "model.pt"}


class ExportError(RuntimeError):
    """A network that cannot be written in the asked format, or whose file does not compute what it does."""


class AfterPreprocess(torch.nn.Module):
    """The network from its normalised input on: trunk, then head."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.trunk, self.head = net.trunk, net.head

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(inputs))


def preprocessing(net: torch.nn.Module, flip: bool) -> dict[str, str]:
    """How a 0-255 RGB image becomes the exported graph's input, as metadata strings."""
    preprocess = net.preprocess
    return {"doppel.input_size": f"{preprocess.size[0]},{preprocess.size[1]}",
            "doppel.channels": "luma" if preprocess.channels == 1 else "bgr" if preprocess.bgr else "rgb",
            "doppel.scale": repr(preprocess.scale),
            "doppel.mean": json.dumps([float(v) for v in preprocess.mean.flatten()]),
            "doppel.std": json.dumps([float(v) for v in preprocess.std.flatten()]),
            "doppel.formula": "input = (resize(image) * scale - mean) / std, channels in the order given "
                              "(luma: 0.299 R + 0.587 G + 0.114 B); layout NCHW float32",
            "doppel.embedding_dim": str(net.embedding_dim), "doppel.output": "embedding; L2-normalise it",
            "doppel.mirror_fusion": str(flip).lower()}


def export(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    """Writes ``model.onnx`` or ``model.pt`` into ``cfg.paths.output_dir``; returns its path."""
    kind = cfg.format
    if kind not in FORMATS:
        raise ValueError(f"format={kind} is not one of {', '.join(FORMATS)}.")
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    cfg, datamodule, network, _ = one_network(cfg, overrides or [], "export.py")
    net = network()
    data = datamodule.data
    count = min(cfg.export.check_images, len(data.images))
    images = torch.stack([datamodule.transform(data.images[i], None) for i in range(count)])
    with torch.no_grad():
        inputs = net.preprocess(images)
    target = output_dir / FORMATS[kind]
    metadata = preprocessing(net, resolve_flip(cfg))
    core = AfterPreprocess(net).eval()
    write = _write_onnx if kind == "onnx" else _write_torchscript
    difference = _largest_difference(core, write(core, inputs, target, metadata, cfg.export.opset), inputs)
    tolerance = float(cfg.export.tolerance)
    print(f"export: {target} ({kind}); on {count} images of {data.source}, the largest difference of the normalised "
          f"embeddings from PyTorch's is {difference:.2e} (tolerance {tolerance:g})", flush=True)
    if not difference <= tolerance:
        target.unlink()
        raise ExportError(f"format={kind}: the exported network differs from PyTorch's by {difference:.2e} on real "
                          f"images (tolerance export.tolerance={tolerance:g}); the file was removed.")
    return target


def _largest_difference(core: torch.nn.Module, run: Callable[[torch.Tensor], Any], inputs: torch.Tensor) -> float:
    """Of the normalised embeddings, PyTorch's against the written file's (``run``), on ``inputs`` and on one
    row fewer (the batch axis is dynamic)."""
    worst = 0.0
    for batch in (inputs, inputs[: max(1, len(inputs) - 1)]):
        with torch.no_grad():
            expected, got = core(batch), torch.as_tensor(np.asarray(run(batch))).float()
        worst = max(worst, float((F.normalize(expected, dim=1) - F.normalize(got, dim=1)).abs().max()))
    return worst


def _write_onnx(core: torch.nn.Module, inputs: torch.Tensor, target: Path, metadata: dict[str, str],
                opset: int) -> Callable[[torch.Tensor], Any]:
    """Writes ``target``; returns how to run it (onnxruntime)."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise ImportError("format=onnx needs onnx and onnxruntime: pip install -e \".[export]\".") from None
    partial = target.with_suffix(".partial")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter: no onnxscript needed
            torch.onnx.export(core, (inputs,), str(partial), input_names=["input"], output_names=["embedding"],
                              dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
    except Exception as error:
        partial.unlink(missing_ok=True)
        raise ExportError(f"format=onnx: this backbone cannot be written as ONNX opset {opset}: "
                          f"{str(error).splitlines()[0]}. Try export.opset=18, or format=torchscript.") from None
    model = onnx.load(str(partial))
    for key, value in metadata.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(partial))
    partial.replace(target)
    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    return lambda batch: session.run(None, {"input": batch.numpy()})[0]


def _write_torchscript(core: torch.nn.Module, inputs: torch.Tensor, target: Path, metadata: dict[str, str],
                       opset: int) -> Callable[[torch.Tensor], Any]:
    """Writes ``target``; returns how to run it (``torch.jit.load``)."""
    try:
        with torch.no_grad():
            traced = torch.jit.trace(core, (inputs,), check_trace=False)
    except Exception as error:
        raise ExportError(f"format=torchscript: this backbone cannot be traced: {str(error).splitlines()[0]}.") \
            from None
    partial = target.with_suffix(".partial")
    torch.jit.save(traced, str(partial), _extra_files={"doppel.json": json.dumps(metadata)})
    partial.replace(target)
    return torch.jit.load(str(target))
