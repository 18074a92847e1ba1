"""``train(cfg)``: build everything from the composed config, fit, evaluate, return the metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.utilities import rank_zero_only

from doppel.callbacks.doppelganger_mining import DoppelgangerMining
from doppel.data.datamodule import EmojiDataModule
from doppel.data.transforms import PaperAugment, normalize
from doppel.losses.loss_set import LossSet
from doppel.models.layers import lsuv_init_
from doppel.module import DoppelModule
from doppel.sampling.doppelganger import DoppelgangerTable

# The Hydra config tree of the repository (editable install / source checkout).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def validate_config(cfg: DictConfig, datamodule: EmojiDataModule, loss_set: LossSet) -> None:
    """Fail before training, with the key and the fix, on settings that cannot work."""
    if "Doppelganger" in cfg.sampler._target_ and not cfg.doppel.mine:
        raise ValueError("sampler=doppel needs doppel.mine=true: without mining its table stays empty.")
    if cfg.doppel.mine and loss_set.prototype_term is None:
        raise ValueError("doppel.mine=true needs a prototype loss term (e.g. loss=l2s_mb); "
                         "or set doppel.mine=false with sampler=random.")
    datamodule.build_sampler()  # the sampler checks its own settings against the data


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and evaluate one run; returns the final metrics (``test/base/...``, ``test/novel/...``)."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    datamodule = instantiate(cfg.data)
    datamodule.setup()
    num_classes = datamodule.num_classes

    image_size = datamodule.image_shape()[-1]
    backbone = instantiate(cfg.backbone, input_size=image_size)
    loss_set = LossSet(cfg.loss.terms, embedding_dim=backbone.embedding_dim, num_classes=num_classes)

    table = DoppelgangerTable(num_classes, cfg.doppel.top_k, cfg.doppel.reduction)
    datamodule.attach_sampler(cfg.sampler, table, cfg.seed)
    validate_config(cfg, datamodule, loss_set)

    if cfg.lsuv.enabled and cfg.ckpt_path is None:
        train_images = datamodule.split.training_set()[0]
        generator = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randperm(len(train_images), generator=generator)[: cfg.lsuv.batch_size]
        lsuv_init_(backbone, normalize(train_images[pick]))

    optimizer = instantiate(cfg.optim)
    scheduler = instantiate(cfg.sched) if cfg.sched else None
    module = DoppelModule(backbone, loss_set, optimizer, scheduler,
                          augment=PaperAugment(**cfg.augment, seed=cfg.seed))

    callbacks: list[pl.Callback] = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if cfg.doppel.mine:
        callbacks.append(DoppelgangerMining(table, datamodule.split.names, cfg.doppel.n_hubs))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    save_config(cfg, output_dir)

    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      use_distributed_sampler=False)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        if module.val_step == trainer.global_step:  # the last epoch was validated: same weights, same data
            metrics = {"test/" + k[4:]: float(v) for k, v in module.final_metrics.items() if k.startswith("val/")}
        else:
            trainer.test(module, datamodule=datamodule, verbose=False)
            metrics = {k: float(v) for k, v in module.final_metrics.items() if k.startswith("test/")}
        metrics["train/epochs"] = float(trainer.current_epoch)
        metrics["doppel/table_filled"] = table.filled_fraction()
        report(metrics, output_dir)
    finally:
        finish_wandb(loggers)
    return metrics


@rank_zero_only
def save_config(cfg: DictConfig, output_dir: Path) -> None:
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


@rank_zero_only
def report(metrics: dict[str, float], output_dir: Path) -> None:
    """Print the final metrics as a table and write them to ``metrics.json``."""
    from rich.console import Console
    from rich.table import Table

    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    table = Table(title=f"final metrics ({output_dir / 'metrics.json'})")
    table.add_column("metric")
    for split in ("base", "novel"):
        table.add_column(split, justify="right")
    names = sorted({k.split("/", 2)[2] for k in metrics if k.startswith("test/")})
    for name in names:
        table.add_row(name, *(_percent(metrics.get(f"test/{s}/{name}")) for s in ("base", "novel")))
    Console().print(table)


def _percent(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}%"


def finish_wandb(loggers: list[Any]) -> None:
    """Close the W&B run so that each multirun job gets its own."""
    from pytorch_lightning.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        wandb.finish()
