"""Train and evaluate: ``python train.py [group=choice ...]`` (see configs/train.yaml)."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> float:
    from doppel.train import RunInterrupted, train

    try:
        metrics = train(cfg)
    except RunInterrupted as stop:
        print(stop, file=sys.stderr)
        sys.exit(128 + stop.signum)  # the shell's code for a process ended by that signal
    if cfg.objective not in metrics:  # a valid name, but this data has no queries of that split
        raise ValueError(f"objective={cfg.objective} was not computed by this run: the data has no queries "
                         f"for it; choose one of {sorted(metrics)}.")
    return metrics[cfg.objective]


if __name__ == "__main__":
    main()
