"""Evaluate a checkpoint or an external backbone: ``python eval.py ckpt_path=<run>/checkpoints/last.ckpt
[eval=<protocol> ...] [data=<format> data.root=...]`` (docs/evaluation.md)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

import doppel.trainer_node  # noqa: F401  (every Trainer argument settable as trainer.<name>=)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    from doppel.cli import reported
    from doppel.evaluate import evaluate

    metrics = reported(evaluate, cfg, list(HydraConfig.get().overrides.task))
    return metrics[metrics.objective]


if __name__ == "__main__":
    import sys

    from doppel.cli import check_overrides

    check_overrides("train", sys.argv[1:])
    main()
