"""``evaluate(cfg)``: score a checkpoint of a run, or an external backbone, with the configured protocols;
no training code runs (no sampler, no optimiser, no mining).

With ``ckpt_path`` the run's own settings are used for what made the weights (backbone, loss) and, unless
the command line names them, for the data and the protocols, so a plain ``python eval.py
ckpt_path=<run>/checkpoints/last.ckpt`` repeats the run's final evaluation; ``data.root=...`` and other
dotted settings on the command line still apply on top (data moved to another disk).

``ckpt_path=[a.ckpt,b.ckpt,...]`` scores the checkpoints as one ensemble (the Doppelganger paper's
Table 6): each network embeds with its own settings, the embeddings stand side by side, and every
similarity is the mean of the networks' cosine similarities; data and protocols come from the first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_info

from doppel.checkpoint import STAMP, check_finite, check_state_dict, read_checkpoint, read_class_rows
from doppel.config import bind_evaluator, build, check_devices
from doppel.environment import save_environment, use_threads
from doppel.losses.loss_set import LossSet
from doppel.models.ensemble import EnsembleNet
from doppel.module import DoppelModule
from doppel.reporting import RunMetrics, finish_wandb, report, save_config
from doppel.serialization import CheckpointError

# Settings that made the weights: always the checkpoint's.
WEIGHTS = ("backbone", "loss", "regularizer")
# Settings taken from the checkpoint unless the command line chooses them.
RUN = ("data", "eval", "objective")


def evaluate(cfg: DictConfig, overrides: list[str] | None = None) -> RunMetrics:
    """Metrics ``test/...`` of the checkpoint ``cfg.ckpt_path`` (or of ``cfg.backbone`` as built, e.g. a timm
    model with ``backbone.pretrained_path``); ``overrides`` are the command line's, which win over the
    checkpoint's settings."""
    check_devices(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("devices", "auto"))
    threads = use_threads(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = [] if cfg.ckpt_path is None else [str(p) for p in cfg.ckpt_path] if OmegaConf.is_list(cfg.ckpt_path) \
        else [str(cfg.ckpt_path)]
    checkpoints = [run_checkpoint(path) for path in paths]
    checkpoint = checkpoints[0] if len(checkpoints) == 1 else None
    members = [with_run_settings(cfg, c[STAMP]["config"], overrides or []) for c in checkpoints]
    if members:
        cfg = members[0]
    pl.seed_everything(cfg.seed, workers=True)  # a head built fresh (external backbone) is the same each time
    datamodule = build(cfg.data)
    datamodule.setup()
    evaluator, objective = bind_evaluator(cfg, datamodule)
    if len(checkpoints) > 1:
        backbone = _ensemble(members, checkpoints, paths, datamodule.image_shape()[-1])
        evaluator.blocks = backbone.blocks
        needing = [name for name, p in evaluator.protocols.items() if p.needs_classifier]
        if needing:
            raise ValueError(f"eval.{needing[0]} scores with a training classifier, which an ensemble of "
                             "checkpoints has not: choose a protocol that scores embeddings only (eval=prototype "
                             "with base_prototypes=mean, retrieval or face_verification).")
        rank_zero_info(f"evaluating the ensemble of {', '.join(paths)}")
    else:
        backbone = build(cfg.backbone, image_size=datamodule.image_shape()[-1])
    loss_set = LossSet(cfg.loss.terms, embedding_dim=backbone.embedding_dim, num_classes=datamodule.num_classes,
                       regularizer=cfg.get("regularizer"), classifier=cfg.get("classifier"),
                       seed=cfg.seed)
    evaluator.check_model(loss_set)
    module = DoppelModule(backbone, loss_set, optimizer=None, augment=build(cfg.augment),
                          views=cfg.loss.views, evaluator=evaluator)
    if checkpoint is not None:
        check_state_dict(checkpoint, module.state_dict(), f"ckpt_path={cfg.ckpt_path!r}")
        module.load_state_dict(checkpoint["state_dict"])
        rank_zero_info(f"evaluating {cfg.ckpt_path} (step {checkpoint.get('global_step')})")
    if cfg.speed.channels_last:
        backbone.to_channels_last()
    save_config(cfg, output_dir)
    save_environment(output_dir, threads)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    trainer = pl.Trainer(accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
                         strategy=cfg.trainer.strategy, precision=cfg.trainer.precision, logger=loggers or False,
                         enable_progress_bar=cfg.trainer.get("enable_progress_bar", True),
                         enable_model_summary=False, use_distributed_sampler=False,
                         default_root_dir=str(output_dir))
    try:
        trainer.test(module, datamodule=datamodule, verbose=False)
        metrics: dict[str, Any] = {k: float(v) for k, v in module.final_metrics.items() if k.startswith("test/")}
        report(metrics, evaluator, output_dir, loggers, html=cfg.report)
    finally:
        finish_wandb(loggers)
    return RunMetrics(metrics, objective)


def run_checkpoint(path: str) -> dict[str, Any]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"ckpt_path={str(file)!r} is not a file: point it at a run's checkpoints/last.ckpt.")
    checkpoint = read_class_rows(read_checkpoint(file), optimizer=False)  # the weights, whole
    if STAMP not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"ckpt_path={str(file)!r} was not written by a Doppel run; evaluate other weights "
                              "through the backbone (backbone=timm backbone.pretrained_path=...).")
    check_finite(checkpoint["state_dict"], f"ckpt_path={str(file)!r}")
    return checkpoint


def _ensemble(members: list[DictConfig], checkpoints: list[dict[str, Any]], paths: list[str],
              image_size: int) -> EnsembleNet:
    """Each checkpoint's backbone, built with its own settings and weights."""
    return EnsembleNet([checkpoint_backbone(member, checkpoint, path, image_size)
                        for member, checkpoint, path in zip(members, checkpoints, paths)])


def one_network(cfg: DictConfig, overrides: list[str], script: str) -> tuple[DictConfig, Any, Any, str | None]:
    """For the scripts that use one network (embed.py, export.py): ``cfg`` with the checkpoint's settings, as
    eval.py applies them; the data module, set up; ``network()``, which builds the backbone (in eval mode) with
    the checkpoint's weights, or as configured without ``ckpt_path``; the checkpoint's resolved path."""
    check_devices(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("devices", "auto"))
    use_threads(cfg)
    checkpoint, path = None, None
    if cfg.ckpt_path is not None:
        if OmegaConf.is_list(cfg.ckpt_path):
            raise ValueError(f"{script} takes one checkpoint (ckpt_path=<run>/checkpoints/last.ckpt), not a list.")
        path = str(Path(str(cfg.ckpt_path)).expanduser().resolve())
        checkpoint = run_checkpoint(path)
        cfg = with_run_settings(cfg, checkpoint[STAMP]["config"], overrides)
    datamodule = build(cfg.data)
    datamodule.setup()

    def network() -> Any:
        return build_network(cfg, checkpoint, path, datamodule.image_shape()[-1])

    return cfg, datamodule, network, path


def build_network(cfg: DictConfig, checkpoint: dict[str, Any] | None, path: str | None, image_size: int) -> Any:
    """The backbone in eval mode: with the checkpoint's weights, or as ``cfg.backbone`` builds it (an external
    backbone) without one."""
    net = checkpoint_backbone(cfg, checkpoint, path, image_size) if checkpoint is not None \
        else build(cfg.backbone, image_size=image_size)
    return net.eval()


def checkpoint_backbone(cfg: DictConfig, checkpoint: dict[str, Any], path: str, image_size: int) -> Any:
    """The backbone of ``cfg`` (the checkpoint's settings) with the checkpoint's backbone weights."""
    net = build(cfg.backbone, image_size=image_size)
    weights = {k.removeprefix("backbone."): v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"ckpt_path {path!r}: its backbone weights do not fit its backbone settings "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]}).")
    return net


def with_run_settings(cfg: DictConfig, saved: dict[str, Any], overrides: list[str]) -> DictConfig:
    """``cfg`` with the checkpoint's settings for :data:`WEIGHTS`, and for :data:`RUN` unless a group
    choice on the command line replaced them; dotted overrides (``data.root=...``) are applied again on top."""
    chosen = {o.lstrip("+~").split("=", 1)[0] for o in overrides}
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in WEIGHTS + RUN:
            if key in saved and (key in WEIGHTS or key not in chosen):
                cfg[key] = saved[key]
        for override in overrides:
            name, _, value = override.lstrip("+").partition("=")
            if "." in name and name.split(".")[0] in WEIGHTS + RUN and not override.startswith("~"):
                OmegaConf.update(cfg, name, OmegaConf.create({"v": _parse(value)}).v, merge=False)
    return cfg


def _parse(value: str) -> Any:
    """A command-line value as Hydra reads it (numbers, booleans, null, lists)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(f"key={value}").value()
