"""Train and evaluate: ``python train.py [group=choice ...]`` (see configs/train.yaml)."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    from doppel.train import train

    return train(cfg).get(cfg.objective, float("nan"))


if __name__ == "__main__":
    main()
