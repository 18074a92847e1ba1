"""``train(cfg)``: build everything from the composed config, fit, evaluate, return the metrics."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only

from doppel.callbacks.checkpointing import LastCheckpoint, RunInterrupted
from doppel.callbacks.doppelganger_mining import DoppelgangerMining
from doppel.callbacks.exact_resume import ExactResume
from doppel.callbacks.exposure import ExposureMonitor
from doppel.checkpoint import (
    SafeCheckpointIO,
    check_checkpoint,
    check_finite,
    check_same_data,
    check_state_dict,
    checkpoint_dir,
    copy_matching_weights,
    read_checkpoint,
    read_class_rows,
    resolve_ckpt_path,
)
from doppel.config import CONFIG_DIR, Prepared, bind_evaluator, build, check_config, resolve_mining, summary_metrics
from doppel.environment import save_environment, use_threads
from doppel.loggers import multirun_folder  # noqa: F401  (registers ${doppel_multirun:} for the configs)
from doppel.losses.loss_set import LossSet
from doppel.models.layers import lsuv_init_
from doppel.module import DoppelModule
from doppel.reporting import RunMetrics, finish_wandb, report, save_config
from doppel.run_lock import run_lock
from doppel.sampling.doppelganger import DoppelgangerTable
from doppel.serialization import check_writable

__all__ = ["CONFIG_DIR", "RunInterrupted", "RunMetrics", "train"]


def train(cfg: DictConfig) -> RunMetrics:
    """Fit and evaluate one run; returns the final metrics of every protocol in ``cfg.eval``.

    Raises :class:`RunInterrupted` when SIGTERM / SIGINT stopped training (a checkpoint was saved), and
    :class:`RunDirectoryBusy` when another run is using the run directory.
    """
    prepared = check_config(cfg)  # seconds, before anything is loaded
    with run_lock(Path(cfg.paths.output_dir)):
        return _train(cfg, prepared)


def _train(cfg: DictConfig, prepared: Prepared) -> RunMetrics:
    output_dir = Path(cfg.paths.output_dir)
    threads = use_threads(cfg)
    datamodule = build(cfg.data)  # checks its settings; loads nothing until setup()
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    checkpoint = None
    if ckpt_path is not None:
        checkpoint = read_checkpoint(ckpt_path)
        check_checkpoint(checkpoint, config, f"ckpt_path={str(ckpt_path)!r}")
        rank_zero_info(f"resuming from {ckpt_path} (step {checkpoint.get('global_step')})")
    elif cfg.ckpt_path == "auto":
        rank_zero_info(f"ckpt_path=auto: no checkpoint in {checkpoint_dir(output_dir)}, starting a new run")
    start_weights = None
    if cfg.init_from is not None and checkpoint is None:  # a resumed run already holds the fine-tuned weights
        start_weights = read_class_rows(read_checkpoint(cfg.init_from, key="init_from"), optimizer=False)
        check_finite(start_weights, f"init_from={cfg.init_from!r}")

    pl.seed_everything(cfg.seed, workers=True)
    datamodule.setup()
    num_classes = datamodule.num_classes
    evaluator, objective = bind_evaluator(cfg, datamodule, prepared.evaluator, summary_metrics(prepared.mine))

    backbone = build(cfg.backbone, image_size=datamodule.image_shape()[-1])
    loss_set = LossSet(cfg.loss.terms, embedding_dim=backbone.embedding_dim, num_classes=num_classes,
                       regularizer=cfg.get("regularizer"), classifier=cfg.get("classifier"),
                       seed=cfg.seed)
    evaluator.check_model(loss_set)

    table = DoppelgangerTable(num_classes, cfg.doppel.top_k, cfg.doppel.reduction)
    mine, sampler_cfg = resolve_mining(cfg, loss_set.prototype_term is not None)
    if mine and cfg.classifier.negatives == "doppel":
        loss_set.read_table(table)
    datamodule.attach_sampler(sampler_cfg, table, cfg.seed)
    datamodule.build_sampler()  # the sampler checks its own settings against the data

    if cfg.lsuv.enabled and checkpoint is None and start_weights is None:
        generator = torch.Generator().manual_seed(cfg.seed)
        lsuv_init_(backbone, datamodule.training_images(cfg.lsuv.batch_size, generator))
    if cfg.speed.channels_last:
        backbone.to_channels_last()
    if cfg.speed.compile:
        mode = None if cfg.speed.compile_backend != "inductor" else cfg.speed.compile_mode
        backbone.compile(mode=mode, backend=cfg.speed.compile_backend)

    module = DoppelModule(backbone, loss_set, prepared.optimizer, prepared.scheduler, augment=prepared.augment,
                          views=cfg.loss.views, evaluator=evaluator, decay_1d_params=prepared.decay_1d_params,
                          mining=table.mining if mine else None)
    if checkpoint is not None:
        check_same_data(checkpoint, num_classes, f"ckpt_path={str(ckpt_path)!r}")
        check_state_dict(checkpoint, module.state_dict(), f"ckpt_path={str(ckpt_path)!r}")
    if start_weights is not None:
        left = copy_matching_weights(start_weights, module, f"init_from={cfg.init_from!r}")
        rank_zero_info(f"init_from={cfg.init_from}: weights loaded; kept at initialisation: {left or 'none'}")

    callbacks: list[pl.Callback] = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not cfg.trainer.get("enable_progress_bar", True):
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if mine:
        callbacks.append(DoppelgangerMining(table, datamodule.class_names, cfg.doppel.n_hubs,
                                            datamodule.base_lookalikes))
    # Before LastCheckpoint: a checkpoint written at a step's end holds that step's counts.
    callbacks.append(ExposureMonitor(num_classes))
    callbacks += [ExactResume(config, num_classes),
                  LastCheckpoint(checkpoint_dir(output_dir), cfg.checkpoint.every_n_steps,
                                 cfg.checkpoint.class_shards)]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    if checkpoint is not None:
        for logger in loggers:
            if hasattr(logger, "resume_before"):
                logger.resume_before(checkpoint["global_step"])
    save_config(cfg, output_dir)
    save_environment(output_dir, threads)

    if rank_zero_only.rank == 0:  # weights, optimizer state (momentum or Adam's two) and the rest, roughly
        check_writable(checkpoint_dir(output_dir), 3 * sum(p.numel() * p.element_size() for p in module.parameters())
                       + table.table.numel() * 8 + 2**20)
    io = SafeCheckpointIO((ckpt_path, checkpoint) if checkpoint is not None else None)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                      use_distributed_sampler=False, plugins=[io])
    try:
        with warnings.catch_warnings():
            # ExactResume restores the sampler's position in the epoch, which Lightning cannot see.
            warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if module.val_step == trainer.global_step:  # the last epoch was validated: same weights, same data
            metrics = {"test/" + k[4:]: float(v) for k, v in module.final_metrics.items() if k.startswith("val/")}
        else:
            trainer.test(module, datamodule=datamodule, verbose=False)
            metrics = {k: float(v) for k, v in module.final_metrics.items() if k.startswith("test/")}
        metrics["train/epochs"] = float(trainer.current_epoch)
        if mine:
            metrics["doppel/table_filled"] = table.filled_fraction()
        report(metrics, evaluator, output_dir, loggers, html=cfg.report)
    finally:
        finish_wandb(loggers)
    return RunMetrics(metrics, objective)
