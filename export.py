"""Export a checkpoint's network: ``python export.py ckpt_path=<run>/checkpoints/last.ckpt format=onnx``
(or ``format=torchscript``) -> ``<run dir>/model.onnx`` with its preprocessing in the metadata, checked with
onnxruntime against PyTorch on real images (README, "Using a trained model")."""

import hydra
from omegaconf import DictConfig

import doppel.trainer_node  # noqa: F401  (every Trainer argument settable as trainer.<name>=)


@hydra.main(version_base="1.3", config_path="configs", config_name="export")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from doppel.cli import reported
    from doppel.export import ExportError, export

    reported(export, cfg, list(HydraConfig.get().overrides.task), extra=(ExportError,))


if __name__ == "__main__":
    import sys

    from doppel.cli import check_overrides

    check_overrides("export", sys.argv[1:])
    main()
