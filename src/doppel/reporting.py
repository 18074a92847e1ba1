"""What a finished run or evaluation leaves: its metrics as a value, ``config.yaml``, ``metrics.json``, the
protocols' figures, ``report.html``, the printed table, and the W&B run closed. Shared by ``train()`` and
``evaluate()``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from doppel.evaluation.evaluator import Evaluator
from doppel.loggers import log_media
from doppel.report import write_report


class RunMetrics(dict):
    """The final metrics (``test/<protocol metric>``, ``train/epochs``, ...); ``objective`` names the one
    ``objective`` selects (resolved from ``auto``)."""

    def __init__(self, metrics: dict[str, float], objective: str) -> None:
        super().__init__(metrics)
        self.objective = objective


@rank_zero_only
def save_config(cfg: DictConfig, output_dir: Path) -> None:
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


@rank_zero_only
def report(metrics: dict[str, float], evaluator: Evaluator, output_dir: Path, loggers: list[Any],
           html: bool = True) -> None:
    """Write ``metrics.json``, each protocol's curves (PNG, and W&B images) and ``report.html``; print the
    final table."""
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    figures = evaluator.write_figures(output_dir)
    log_images(loggers, figures)
    tested = {k[len("test/"):]: v for k, v in metrics.items() if k.startswith("test/")}
    lines = [f"final metrics ({output_dir / 'metrics.json'})", *evaluator.summary(tested)]
    lines += [f"curves: {', '.join(str(f) for f in figures)}"] if figures else []
    lines += [f"report: {write_report([output_dir], output_dir / 'report.html')}"] if html else []
    print("\n".join(lines), flush=True)


def log_images(loggers: list[Any], paths: list[Path]) -> None:
    """The curves as images ``eval/<name>`` of the W&B and TensorBoard loggers."""
    log_media(loggers, {f"eval/{p.stem}": ("image", p) for p in paths})


def finish_wandb(loggers: list[Any]) -> None:
    """Close the W&B run so that each multirun job gets its own."""
    from pytorch_lightning.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()
