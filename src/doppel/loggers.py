"""Loggers with what a resumable run needs."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

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
