"""The protocols' curves as matplotlib figures (Agg: no display needed), saved as PNG by the evaluator
and sent to W&B as images."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def precision_coverage_figure(curves: dict[str, tuple[torch.Tensor, torch.Tensor]],
                              precisions: tuple[float, ...]) -> Figure:
    figure, axes = plt.subplots(figsize=(5.5, 4))
    for split, (coverage, precision) in curves.items():
        axes.plot(coverage.numpy(), precision.numpy(), label=split)
    for p in precisions:
        axes.axhline(p, color="grey", linewidth=0.6, linestyle="--")
    axes.set(xlabel="coverage", ylabel="precision", xlim=(0, 1), title="precision-coverage (prototypes)")
    axes.legend(loc="upper right")
    figure.tight_layout()
    return figure


def roc_figure(rocs: dict[str, tuple[torch.Tensor, torch.Tensor, dict[float, float]]],
               title: str = "ROC (verification pairs)") -> Figure:
    figure, axes = plt.subplots(figsize=(5.5, 4))
    for name, (far, tar, points) in rocs.items():
        line, = axes.plot(far.clamp_min(1e-6).numpy(), tar.numpy(), label=name)
        for at, value in points.items():
            axes.plot([at], [value], "o", color=line.get_color())
            axes.annotate(f"{100 * value:.1f}% @ {at:g}", (at, value), fontsize=7, xytext=(4, -10),
                          textcoords="offset points")
    axes.set(xscale="log", xlabel="false accept rate", ylabel="true accept rate", xlim=(1e-6, 1), ylim=(0, 1.01),
             title=title)
    axes.legend(loc="lower right")
    figure.tight_layout()
    return figure


def recall_bars_figure(recalls: dict[int, float]) -> Figure:
    figure, axes = plt.subplots(figsize=(5.5, 4))
    labels = [f"R@{k}" for k in recalls]
    bars = axes.bar(labels, [100 * v for v in recalls.values()])
    axes.bar_label(bars, fmt="%.1f", fontsize=8)
    axes.set(ylabel="recall (%)", ylim=(0, 105), title="Recall@K (retrieval)")
    figure.tight_layout()
    return figure
