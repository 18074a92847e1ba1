"""Train and evaluate: ``python train.py [group=choice ...]`` (see configs/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig

import doppel.trainer_node  # noqa: F401  (every Trainer argument settable as trainer.<name>=)


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    from doppel.cli import reported
    from doppel.train import RunInterrupted, train

    try:
        metrics = reported(train, cfg)
    except RunInterrupted as stop:
        print(stop, file=sys.stderr)
        sys.exit(128 + stop.signum)  # the shell's code for a process ended by that signal
    return metrics[metrics.objective]


if __name__ == "__main__":
    from doppel.cli import check_overrides

    check_overrides("train", sys.argv[1:])
    main()
