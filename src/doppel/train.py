"""``train(cfg)``: build everything from the composed config, fit, evaluate, return the metrics."""

from __future__ import annotations

import inspect
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
from doppel.data.transforms import PaperAugment
from doppel.losses.loss_set import LossSet
from doppel.models.layers import lsuv_init_
from doppel.module import DoppelModule
from doppel.sampling.doppelganger import DoppelgangerTable
from doppel.sampling.samplers import IdentityBatchSampler

# The Hydra config tree of the repository (editable install / source checkout).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def resolve_mining(cfg: DictConfig, loss_set: LossSet) -> tuple[bool, DictConfig]:
    """Whether to mine doppelgangers, and the sampler config to build.

    ``doppel.mine=auto`` mines whenever the loss has a prototype term; ``sampler=auto`` (the default) is
    the doppel sampler then and the random one for exemplar-only losses, which have no logits to mine.
    """
    has_prototype = loss_set.prototype_term is not None
    mine = has_prototype if cfg.doppel.mine == "auto" else bool(cfg.doppel.mine)
    if mine and not has_prototype:
        raise ValueError("doppel.mine=true needs a prototype loss term (e.g. loss=l2s_mb); "
                         "or set doppel.mine=auto with sampler=random.")
    settings = OmegaConf.to_container(cfg.sampler, resolve=True)
    if settings.pop("random_without_prototype", False) and not has_prototype:
        accepted = inspect.signature(IdentityBatchSampler).parameters
        settings = {k: v for k, v in settings.items() if k in accepted}
        settings["_target_"] = f"{IdentityBatchSampler.__module__}.{IdentityBatchSampler.__name__}"
    if "Doppelganger" in settings["_target_"] and not mine:
        raise ValueError("sampler=doppel needs doppelganger mining, which needs a prototype loss term "
                         "(e.g. loss=l2s_mb) and doppel.mine=auto or true; use sampler=random otherwise.")
    return mine, OmegaConf.create(settings)


def validate_config(cfg: DictConfig, datamodule: EmojiDataModule) -> None:
    """Fail before training, with the key and the fix, on settings that cannot work."""
    views = cfg.loss.get("views", 1)
    if views > 1 and not (cfg.augment.mirror or cfg.augment.color_shift > 0 or cfg.augment.grayscale_p > 0):
        raise ValueError(f"loss.views={views} needs augmentation to make the views differ: enable augment.mirror, "
                         "augment.color_shift or augment.grayscale_p.")
    datamodule.build_sampler()  # the sampler checks its own settings against the data


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and evaluate one run; returns the final metrics (``test/base/...``, ``test/novel/...``)."""
    pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    datamodule = instantiate(cfg.data)
    datamodule.setup()
    num_classes = datamodule.num_classes

    backbone = instantiate(cfg.backbone, image_size=datamodule.image_shape()[-1])
    loss_set = LossSet(cfg.loss.terms, embedding_dim=backbone.embedding_dim, num_classes=num_classes,
                       regularizer=cfg.get("regularizer"))

    table = DoppelgangerTable(num_classes, cfg.doppel.top_k, cfg.doppel.reduction)
    mine, sampler_cfg = resolve_mining(cfg, loss_set)
    datamodule.attach_sampler(sampler_cfg, table, cfg.seed)
    validate_config(cfg, datamodule)

    if cfg.lsuv.enabled and cfg.ckpt_path is None:
        train_images = datamodule.split.training_set()[0]
        generator = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randperm(len(train_images), generator=generator)[: cfg.lsuv.batch_size]
        lsuv_init_(backbone, train_images[pick])
    if cfg.speed.channels_last:
        backbone.to_channels_last()
    if cfg.speed.compile:
        mode = None if cfg.speed.compile_backend != "inductor" else cfg.speed.compile_mode
        backbone.compile(mode=mode, backend=cfg.speed.compile_backend)

    optimizer = instantiate(cfg.optim)
    scheduler = instantiate(cfg.sched) if cfg.sched else None
    module = DoppelModule(backbone, loss_set, optimizer, scheduler,
                          augment=PaperAugment(**cfg.augment, seed=cfg.seed), views=cfg.loss.get("views", 1))

    callbacks: list[pl.Callback] = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if mine:
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
