"""Embed every image of a data config with a checkpoint (or an external backbone): ``python embed.py
ckpt_path=<run>/checkpoints/last.ckpt [data=<format> data.root=...]`` -> ``<run dir>/embeddings.npz`` and
``index.csv`` (README, "Using a trained model")."""

import hydra
from omegaconf import DictConfig

import doppel.trainer_node  # noqa: F401  (every Trainer argument settable as trainer.<name>=)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from doppel.cli import reported
    from doppel.embed import embed

    reported(embed, cfg, list(HydraConfig.get().overrides.task))


if __name__ == "__main__":
    import sys

    from doppel.cli import check_overrides

    check_overrides("train", sys.argv[1:])
    main()
