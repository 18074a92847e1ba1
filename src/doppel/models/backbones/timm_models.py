"""Any timm model as a trunk: ``backbone=timm backbone.model=convnext_tiny``.

The model is built without its classifier (``num_classes=0``) and with its own global pooling, so
the trunk returns one feature vector per image; our :class:`~doppel.models.heads.EmbeddingHead` maps
it to the embedding. Pretrained weights come only from a local file (``backbone.pretrained_path``,
a ``.pth``/``.bin``/``.safetensors`` of that model): nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from doppel.serialization import load_checkpoint


class TimmTrunk(nn.Module):
    def __init__(self, model: str, pretrained_path: str | None = None, in_channels: int = 3, **timm_options) -> None:
        super().__init__()
        import timm  # imported here: it takes a second, and only this backbone needs it

        if model not in timm.list_models():
            close = timm.list_models(f"*{model.split('_')[0]}*")[:8]
            raise ValueError(f"backbone.model={model!r} is not a timm model; similar names: {close}.")
        options = dict(num_classes=0, in_chans=in_channels, **timm_options)
        if pretrained_path is not None:
            path = Path(pretrained_path)
            if not path.is_file():
                raise FileNotFoundError(f"backbone.pretrained_path={str(path)!r} does not exist; give a local "
                                        "weights file of this model (nothing is downloaded).")
            if path.suffix != ".safetensors":  # a pickle-based file: refused with a clear reason if unsafe
                load_checkpoint(path, key="backbone.pretrained_path")
            # timm reads the local file and drops the classifier's weights itself (num_classes=0).
            options.update(pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        self.model = timm.create_model(model, **options)
        self.out_channels = self.model.num_features
        self.pretrained = pretrained_path is not None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)
