"""The ``trainer`` config node open to every argument of ``pytorch_lightning.Trainer``.

Hydra composes in struct mode, where ``trainer.max_steps=20`` is refused unless the YAML lists the key.
``configs/trainer/default.yaml`` starts from this node, whose struct flag is off, so any Trainer
argument can be set as ``trainer.<name>=``; :func:`doppel.config.check_config` then checks every key
against the Trainer's signature (a typo is an error with a suggestion). Imported by the entry points
before Hydra composes.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

GROUP, NAME = "doppel_nodes", "open_trainer"


def register() -> None:
    node = OmegaConf.create({"_target_": "pytorch_lightning.Trainer"})
    OmegaConf.set_struct(node, False)
    ConfigStore.instance().store(group=GROUP, name=NAME, node=node)


register()
