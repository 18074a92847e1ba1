"""DoppelModule: the backbone may run in reduced precision, the loss terms never do."""

import torch
from torch import nn

from doppel.models import get_backbone
from doppel.module import DoppelModule


class RecordingLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, bool]] = []

    def forward(self, embeddings, labels):
        inner = embeddings @ embeddings.T  # an op autocast would run in bfloat16 if it were on
        self.seen.append((embeddings.dtype, inner.dtype == torch.float32))
        return inner.mean(), {}


def test_loss_terms_run_in_float32_under_bf16_autocast():
    torch.manual_seed(0)
    backbone = get_backbone("ie_cnn_mnist")
    outputs = []
    backbone.head.register_forward_hook(lambda _m, _i, out: outputs.append(out.dtype))
    loss = RecordingLoss()
    module = DoppelModule(backbone, loss, optimizer=None)
    module.log = module.log_dict = lambda *args, **kwargs: None  # no trainer attached
    images, labels = torch.rand(4, 3, 28, 28) * 255, torch.tensor([0, 0, 1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = module.training_step((images, labels), 0)
    assert outputs == [torch.bfloat16]  # the backbone ran under autocast
    assert loss.seen == [(torch.float32, True)] and value.dtype == torch.float32
