"""Loggers with what a resumable run needs."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger as LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.utilities import rank_zero_only


def multirun_folder() -> str | None:
    """The folder of the multirun this job belongs to (None for a single run): ``logger.wandb.group``
    (``${doppel_multirun:}``), so that W&B shows the jobs of one sweep together."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():  # composed by a test or a notebook, not run by Hydra
        return None
    hydra = HydraConfig.get()
    return str(hydra.sweep.dir) if hydra.mode == RunMode.MULTIRUN else None


OmegaConf.register_new_resolver("doppel_multirun", multirun_folder, replace=True)


class CSVLogger(LightningCSVLogger):
    """Lightning's CSV logger, except that a resumed run continues its ``metrics.csv``.

    Lightning's writer deletes the file when it starts. After :meth:`resume_before`, the rows logged
    before the checkpoint's step are kept and the resumed run appends to them; later rows are dropped,
    since the resumed run does those steps again.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step: int | None = None

    def resume_before(self, step: int) -> None:
        self._resume_step = step

    @property
    def experiment(self) -> ExperimentWriter:
        # Only process 0 owns the file: another process rewriting it races with process 0's writer.
        if self._experiment is not None or self._resume_step is None or rank_zero_only.rank != 0:
            return super().experiment
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        header, rows = [], []
        if path.is_file():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                rows = [row for row in reader if row.get("step") and int(float(row["step"])) < self._resume_step]
        with warnings.catch_warnings():  # "previous log files will be deleted": not these rows
            warnings.filterwarnings("ignore", message="Experiment logs directory")
            writer = super().experiment  # removes the file
        if header:
            with open(path, "w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=header)
                out.writeheader()
                out.writerows(rows)
            writer.metrics_keys = header
        return writer


def log_media(loggers: list[Any], payload: dict[str, tuple[str, Any]], step: int | None = None) -> None:
    """Send ``payload`` ({key: (kind, value)}) to every W&B and TensorBoard logger: ``image`` (a PNG path),
    ``histogram`` ((counts, bin edges)), ``table`` ((columns, rows); a uint8 [C, H, W] tensor cell is a picture)."""
    from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

    if not payload:
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logged = {key: _wandb_value(kind, value) for key, (kind, value) in payload.items()}
            logger.experiment.log({**logged, **({} if step is None else {"trainer/global_step": step})})
        elif isinstance(logger, TensorBoardLogger):
            for key, (kind, value) in payload.items():
                _tensorboard_value(logger.experiment, key, kind, value, step or 0)


def _wandb_value(kind: str, value: Any) -> Any:
    import wandb

    if kind == "image":
        return wandb.Image(str(value))
    if kind == "histogram":
        counts, edges = value
        return wandb.Histogram(np_histogram=(np.asarray(counts), np.asarray(edges)))
    columns, rows = value
    return wandb.Table(columns=columns, data=[[_wandb_cell(c) for c in row] for row in rows])


def _wandb_cell(value: Any) -> Any:
    if isinstance(value, torch.Tensor):  # an image, uint8 [C, H, W]
        import wandb

        return wandb.Image(value.expand(3, -1, -1).permute(1, 2, 0).contiguous().numpy())
    return value


def _tensorboard_value(writer: Any, key: str, kind: str, value: Any, step: int) -> None:
    if kind == "image":
        from PIL import Image

        with Image.open(value) as image:
            writer.add_image(key, np.array(image.convert("RGB")), step, dataformats="HWC")
    elif kind == "histogram":
        counts, edges = (np.asarray(v, dtype=np.float64) for v in value)
        centres = (edges[:-1] + edges[1:]) / 2  # TensorBoard wants the sums: taken at the bin centres
        writer.add_histogram_raw(key, min=float(edges[0]), max=float(edges[-1]), num=int(counts.sum()),
                                 sum=float((counts * centres).sum()), sum_squares=float((counts * centres ** 2).sum()),
                                 bucket_limits=edges[1:].tolist(), bucket_counts=counts.tolist(), global_step=step)
    else:  # a table as Markdown; pictures in cells are named, not drawn
        columns, rows = value
        lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join("(picture)" if isinstance(c, torch.Tensor) else str(c) for c in row) + " |"
                  for row in rows]
        writer.add_text(key, "\n".join(lines), step)
