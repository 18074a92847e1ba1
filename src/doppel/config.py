"""Checks of the composed config that need no data, run first by ``train()``, and the parts built from it.

A setting that cannot work fails within seconds, with one sentence naming the key and the fix, never
after data loading or training, and never silently: a key that nothing reads is an error, not dropped.
What needs no data is built here once and handed to ``train()`` (:class:`Prepared`: the augmentation,
the protocols, the optimizer and schedule factories); the loss terms, whose sizes come from the data, are
tried here with stand-in sizes (8 classes), so each term's own checks run before any data is read.
"""

from __future__ import annotations

import difflib
import inspect
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, get_object, instantiate
from omegaconf import DictConfig, OmegaConf

import doppel.trainer_node  # noqa: F401  (registers the open trainer node before any compose)
from doppel.environment import thread_count
from doppel.evaluation.evaluator import Evaluator
from doppel.losses.loss_set import LossSet
from doppel.models.factory import check_backbone
from doppel.module import make_scheduler
from doppel.sampling.doppelganger import DoppelgangerTable

# The Hydra config tree of the repository (editable install / source checkout).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# Keys Hydra reads in a node it instantiates.
HYDRA_KEYS = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_"}
# Arguments the code passes at run time, per kind of node; a config that sets them is wrong.
RUNTIME = {
    "sampler": {"context", "has_prototype"},
    "optim": {"params"},
    "sched": {"optimizer", "T_max"},
    "loss": {"embedding_dim", "num_classes"},
    "regularizer": {"embedding_dim", "num_classes"},
    "trainer": {"callbacks", "logger", "plugins", "use_distributed_sampler"},
}
LOSS_KEYS = ("terms", "views")
# Keys of the optim node that Doppel reads itself (the rest go to the optimizer class).
OPTIM_KEYS = ("decay_1d_params",)
# Callbacks that write to a logger and fail without one.
NEEDS_A_LOGGER = ("pytorch_lightning.callbacks.LearningRateMonitor", "pytorch_lightning.callbacks.DeviceStatsMonitor")


def summary_metrics(mine: bool) -> tuple[str, ...]:
    """The metrics ``train()`` adds to the protocols': the epochs, and the table's fill where it mines."""
    return ("train/epochs", "doppel/table_filled") if mine else ("train/epochs",)


def objectives(evaluator: Evaluator, extra: tuple[str, ...] = ()) -> list[str]:
    """Every metric name returned for the bound protocols (and ``extra``), any of which ``objective`` may
    name."""
    return [f"test/{name}" for name in evaluator.metric_names()] + list(extra)


def resolve_objective(objective: str, evaluator: Evaluator, extra: tuple[str, ...] = ()) -> str:
    """``objective`` checked against the metrics the run will compute (``auto``: the first protocol's
    headline), once the protocols have seen the data."""
    if objective == "auto":
        return f"test/{evaluator.headline()}"
    if objective not in objectives(evaluator, extra):
        raise ValueError(f"objective={objective} is not a metric of this run; choose one of: "
                         f"{', '.join(objectives(evaluator, extra))} (or auto).")
    return objective


def build_evaluator(cfg: DictConfig) -> Evaluator:
    """The protocols of ``cfg.eval`` (each checks its own settings)."""
    return Evaluator({str(name): build(spec) for name, spec in (cfg.get("eval") or {}).items()})


def bind_evaluator(cfg: DictConfig, datamodule: Any, evaluator: Evaluator | None = None,
                   extra: tuple[str, ...] = ()) -> tuple[Evaluator, str]:
    """The protocols (``evaluator``, or built from ``cfg.eval``) bound to the data (each checks it and picks
    its evaluation sets) and the objective, checked against their metric names and ``extra``."""
    evaluator = evaluator or build_evaluator(cfg)
    evaluator.bind(datamodule)
    return evaluator, resolve_objective(cfg.objective, evaluator, extra)


@dataclass
class Prepared:
    """What the config builds before any data is read, once: ``train()`` wires it to the data."""

    augment: Any  # the training augmentation (nn.Module), seeded from ``seed``
    evaluator: Evaluator  # the protocols, not yet bound to the data
    optimizer: Any  # parameter groups -> optimizer
    decay_1d_params: bool
    scheduler: Any | None  # optimizer -> scheduler (see module.make_scheduler), or None
    mine: bool  # the run fills the doppelganger table (doppel.mine, resolved)


def check_config(cfg: DictConfig) -> Prepared:
    """Every check that needs no data; returns the parts built on the way."""
    _check_known_keys(cfg)
    prepared = _check_values(cfg)
    _check_output_dir(Path(cfg.paths.output_dir))
    return prepared


def build(node: DictConfig, **runtime: Any) -> Any:
    """``instantiate(node)`` that raises the component's own error (its sentence names the key), not
    Hydra's wrapper around it."""
    try:
        return instantiate(node, **runtime)
    except InstantiationException as error:
        raise (error.__cause__ or error) from None


def build_optimizer(node: DictConfig) -> tuple[Any, bool]:
    """(the optimizer factory: parameter groups -> optimizer, whether 1-D parameters are weight-decayed)."""
    decay_1d = node.get("decay_1d_params", False)
    if not isinstance(decay_1d, bool):
        raise ValueError(f"optim.decay_1d_params={decay_1d} must be true or false.")
    settings = {k: v for k, v in node.items() if k not in OPTIM_KEYS}
    return instantiate(OmegaConf.create(settings)), decay_1d


def resolve_mining(cfg: DictConfig, has_prototype: bool) -> tuple[bool, DictConfig]:
    """Whether to mine doppelgangers, and the sampler config to build.

    ``doppel.mine=auto`` mines whenever the loss has a prototype term; ``sampler=auto`` (the default) is
    the doppel sampler then and the random one for exemplar-only losses, which have no logits to mine.
    """
    mine = has_prototype if cfg.doppel.mine == "auto" else bool(cfg.doppel.mine)
    if mine and not has_prototype:
        raise ValueError("doppel.mine=true needs a prototype loss term (e.g. loss=l2s_mb); "
                         "or set doppel.mine=auto with sampler=random.")
    settings = OmegaConf.to_container(cfg.sampler, resolve=True)
    target = get_object(settings.pop("_target_"))  # a sampler class, or a function that picks one (auto)
    sampler_class, settings = (target, settings) if inspect.isclass(target) else target(has_prototype, **settings)
    if sampler_class.uses_table and not mine:
        raise ValueError(f"the sampler {sampler_class.__name__} needs doppelganger mining, which needs a prototype "
                         "loss term (e.g. loss=l2s_mb) and doppel.mine=auto or true; use sampler=random otherwise.")
    return mine, OmegaConf.create({"_target_": f"{sampler_class.__module__}.{sampler_class.__qualname__}",
                                   **settings})


# -- keys ----------------------------------------------------------------------------------------
# Names other frameworks use for a setting, too unlike ours for difflib: the "did you mean" they get.
SYNONYMS = {"learning_rate": "lr", "wd": "weight_decay", "epochs": "max_epochs", "num_epochs": "max_epochs",
            "bs": "batch_size", "gpus": "devices", "num_gpus": "devices", "steps": "max_steps"}


def _unknown(key: str, known: set[str] | list[str], what: str) -> ValueError:
    name = key.rsplit(".", 1)[-1]
    hint = [SYNONYMS[name]] if SYNONYMS.get(name) in known else difflib.get_close_matches(name, list(known), n=1)
    return ValueError(f"{key} is not a setting{f' (did you mean {hint[0]}?)' if hint else ''}; {what} takes: "
                      f"{', '.join(sorted(known))}.")


def _check_known_keys(cfg: DictConfig) -> None:
    base = OmegaConf.load(CONFIG_DIR / "train.yaml")
    groups = {next(iter(entry)) for entry in base.defaults if not isinstance(entry, str)}
    sections = {key for key in base if key != "defaults"}
    for key in cfg:
        if key not in groups | sections:
            raise _unknown(str(key), groups | sections, "the top level")
    for section in sections - groups:  # train.yaml's own sections: its keys are the schema
        if OmegaConf.is_dict(base[section]):
            for key in cfg[section]:
                if key not in base[section]:
                    raise _unknown(f"{section}.{key}", set(base[section]), section)
    for key in cfg.loss:
        if key not in LOSS_KEYS:
            raise _unknown(f"loss.{key}", set(LOSS_KEYS), "loss")
    # data's keys are checked when it is built, against its reader's settings (train() does it next).
    nodes = [("sampler", cfg.sampler, set()),
             ("optim", cfg.optim, set(OPTIM_KEYS)), ("sched", cfg.sched, set()), ("trainer", cfg.trainer, set())]
    nodes += [(f"loss.terms.{n}", spec, {"weight"}) for n, spec in (cfg.loss.get("terms") or {}).items()]
    nodes += [(f"regularizer.{n}", spec, {"weight"}) for n, spec in (cfg.get("regularizer") or {}).items()]
    nodes += [(f"{group}.{n}", spec, set()) for group in ("logger", "callbacks", "eval")
              for n, spec in (cfg.get(group) or {}).items()]
    for key, node, extra in nodes:
        if node:
            _check_target_keys(key, node, extra)


def _check_target_keys(key: str, node: DictConfig, extra: set[str]) -> None:
    if "_target_" not in node:
        raise ValueError(f"{key} has no _target_: it must name the class or function to build.")
    try:
        target = get_object(node._target_)
    except Exception:  # any import failure is the same user error
        raise ValueError(f"{key}._target_={node._target_} cannot be imported: check its spelling.") from None
    accepted, open_ended = _parameters(target)
    runtime = RUNTIME.get(key.split(".")[0], set())
    for name in node:
        if name in HYDRA_KEYS or name in extra:
            continue
        if name in runtime:
            raise ValueError(f"{key}.{name} is set by Doppel at run time; remove it from the config.")
        if name not in accepted and not open_ended:
            raise _unknown(f"{key}.{name}", accepted - runtime, f"{key} ({node._target_})")


def _parameters(target: Any) -> tuple[set[str], bool]:
    """Keyword arguments ``target`` accepts, following ``**kwargs`` up a class's bases; and whether it
    accepts any keyword (then its keys cannot be checked here)."""
    classes = target.__mro__ if inspect.isclass(target) else (target,)
    accepted: set[str] = set()
    for owner in classes:
        function = owner.__dict__.get("__init__") if inspect.isclass(owner) else owner
        if function is None:
            continue
        parameters = inspect.signature(function).parameters
        accepted |= {n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
            return accepted, False
    return accepted, True


# -- values --------------------------------------------------------------------------------------
def _settings(node: DictConfig) -> dict[str, Any]:
    return {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in HYDRA_KEYS}


def _check_values(cfg: DictConfig) -> Prepared:
    if not isinstance(cfg.seed, int) or not 0 <= cfg.seed < 2**32:
        raise ValueError(f"seed={cfg.seed} must be an integer in [0, 2**32).")
    backbone = _settings(cfg.backbone)
    check_backbone(**backbone)
    views = cfg.loss.get("views", 1)
    if not isinstance(views, int) or views < 1:
        raise ValueError(f"loss.views={views} must be a positive integer (2 for NT-Xent's two views).")
    augment = build(cfg.augment, seed=cfg.seed)
    if views > 1 and not augment.varies():
        raise ValueError(f"loss.views={views} needs augmentation to make the views differ: enable augment.mirror, "
                         "augment.color_shift, augment.grayscale_p or augment.pad_crop, or choose augment=simclr.")
    embedding_dim = backbone.get("embedding_dim") if isinstance(backbone.get("embedding_dim"), int) else 8
    loss_set = LossSet(cfg.loss.get("terms") or {}, embedding_dim=embedding_dim, num_classes=8,
                       regularizer=cfg.get("regularizer"), classifier=cfg.get("classifier"),
                       seed=cfg.seed)
    DoppelgangerTable.check_settings(cfg.doppel.top_k, cfg.doppel.reduction)
    if cfg.doppel.mine not in ("auto", True, False):
        raise ValueError(f"doppel.mine={cfg.doppel.mine} must be auto, true or false.")
    mine, sampler_cfg = resolve_mining(cfg, loss_set.prototype_term is not None)
    if cfg.classifier.negatives == "doppel" and not mine:
        raise ValueError("classifier.negatives=doppel draws the Partial FC negatives from the doppelganger table, "
                         "which this run does not mine (doppel.mine=false): use classifier.negatives=uniform.")
    get_class(sampler_cfg._target_).check_settings(**_settings(sampler_cfg))
    for key, value in (("doppel.n_hubs", cfg.doppel.n_hubs), ("lsuv.batch_size", cfg.lsuv.batch_size),
                       ("trainer.log_every_n_steps", cfg.trainer.log_every_n_steps)):
        if not isinstance(value, int) or value < (0 if key == "doppel.n_hubs" else 1):
            raise ValueError(f"{key}={value} must be a {'non-negative' if key == 'doppel.n_hubs' else 'positive'} "
                             "integer.")
    for key, value in (("checkpoint.every_n_steps", cfg.checkpoint.every_n_steps),
                       ("trainer.check_val_every_n_epoch", cfg.trainer.check_val_every_n_epoch)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}={value} must be a positive integer or null.")
    if not isinstance(cfg.checkpoint.class_shards, bool):
        raise ValueError(f"checkpoint.class_shards={cfg.checkpoint.class_shards} must be true (each process writes "
                         "its classifier rows) or false (gathered into process 0's file).")
    check_devices(cfg.trainer.get("accelerator", "auto"), cfg.trainer.get("devices", "auto"))
    thread_count(cfg.speed.get("threads", "auto"), cfg.trainer)
    max_epochs, max_steps = cfg.trainer.get("max_epochs"), cfg.trainer.get("max_steps", -1)
    if not (isinstance(max_epochs, int) and max_epochs >= 1) and not (isinstance(max_steps, int) and max_steps >= 1):
        raise ValueError(f"trainer.max_epochs={max_epochs} must be a positive integer (or set trainer.max_steps).")
    factory, decay_1d_params = _build("optim", lambda: build_optimizer(cfg.optim))
    optimizer = _build("optim", lambda: factory([torch.nn.Parameter(torch.zeros(1))]))  # torch's own checks
    scheduler = _build("sched", lambda: instantiate(cfg.sched)) if cfg.get("sched") else None
    if scheduler is not None:
        _build("sched", lambda: make_scheduler(scheduler, optimizer, 1))
    if not cfg.get("logger"):
        for name, spec in (cfg.get("callbacks") or {}).items():
            target = get_object(spec._target_)
            if inspect.isclass(target) and any(issubclass(target, get_class(t)) for t in NEEDS_A_LOGGER):
                raise ValueError(f"callbacks.{name} ({spec._target_}) writes to a logger and logger=none has none: "
                                 f"choose a logger (logger=csv) or remove it (~callbacks.{name}).")
    return Prepared(augment, build_evaluator(cfg), factory, decay_1d_params, scheduler, mine)


def check_devices(accelerator: Any, devices: Any) -> None:
    """A GPU asked for where there is none is an error; more CPU processes than cores, a warning."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.accelerator={accelerator} needs a CUDA GPU and this machine has none (torch "
                         f"{torch.__version__} sees no CUDA device): use trainer.accelerator=cpu, or auto.")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    cores = os.cpu_count() or 1
    if on_cpu and isinstance(devices, int) and devices > cores:
        warnings.warn(f"trainer.devices={devices} starts {devices} processes on {cores} CPU cores and no GPU: each "
                      "gets less than a core and the run is slower than with fewer; use trainer.devices at most "
                      f"{cores}.", stacklevel=2)


def _build(key: str, build: Any) -> Any:
    try:
        return build()
    except Exception as error:  # the component's own check, e.g. torch's "Invalid learning rate"
        cause = error.__cause__ or error
        raise ValueError(f"{key}: {cause} (check the {key}.* settings).") from None


def _check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ValueError(f"paths.output_dir={str(path)!r} is not a writable folder ({error.strerror}): choose "
                         "another run directory (hydra.run.dir=...).") from None
