"""DoppelModule: the backbone may run in reduced precision, the loss terms never do."""

import pytest
import torch
from torch import nn

from doppel.models import get_backbone
from doppel.module import DoppelModule


class RecordingLoss(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, bool]] = []

    prototype_term = None

    def forward(self, embeddings, labels, mining=None, step=0):
        inner = embeddings @ embeddings.T  # an op autocast would run in bfloat16 if it were on
        self.seen.append((embeddings.dtype, inner.dtype == torch.float32))
        return inner.mean(), {}, None


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
    assert loss.seen == [(torch.float32, True)] and value["loss"].dtype == torch.float32


def test_one_dimensional_parameters_are_not_weight_decayed():
    from functools import partial

    torch.manual_seed(0)
    backbone = get_backbone("ie_cnn_mnist")
    module = DoppelModule(backbone, RecordingLoss(), partial(torch.optim.SGD, lr=0.1, weight_decay=0.5))
    optimizer = module.configure_optimizers()
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.5 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(p) for p in module.parameters() if p.dim() > 1}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in module.parameters() if p.dim() == 1}
    # one step with zero gradients: only the decayed (matrix and kernel) parameters shrink, by lr * wd
    before = [p.detach().clone() for p in module.parameters()]
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for old, new in zip(before, module.parameters()):
        expected = old * (1 - 0.1 * 0.5) if old.dim() > 1 else old
        assert torch.allclose(new, expected), old.shape


def test_non_finite_evaluation_embeddings_are_an_error_not_metrics():
    import pytest

    from doppel.data.dataset import Part
    from doppel.evaluation.evaluator import Evaluator
    from doppel.evaluation.retrieval import RetrievalProtocol

    backbone = get_backbone("ie_cnn_mnist")
    evaluator = Evaluator({"retrieval": RetrievalProtocol(ks=[1], clustering=False)})
    evaluator.sets, evaluator.flips, evaluator.sizes = ["split"], [False], [4]
    evaluator.labels, evaluator.parts = torch.tensor([0, 0, 1, 1]), torch.full((4,), int(Part.QUERY))
    loss = RecordingLoss()
    loss.prototype_term = None
    module = DoppelModule(backbone, loss, optimizer=None, evaluator=evaluator)
    module.log_dict = lambda *args, **kwargs: None
    with torch.no_grad():
        backbone.head.fc.weight[0, 0] = float("inf")
    module.eval()
    module._eval_step((torch.rand(4, 3, 28, 28) * 255, torch.arange(4)))
    with pytest.raises(FloatingPointError, match="4 of 4 val embeddings are not finite"):
        module._eval_end("val")


def test_a_scheduler_gets_the_run_length_only_if_it_takes_one():
    from functools import partial

    from doppel.module import make_scheduler

    def optimizer():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    cosine = make_scheduler(partial(torch.optim.lr_scheduler.CosineAnnealingLR, eta_min=0.0), optimizer(), 40)
    assert cosine.T_max == 40
    steps = make_scheduler(partial(torch.optim.lr_scheduler.MultiStepLR, milestones=[2, 3], gamma=0.1), optimizer(), 40)
    lrs = []
    for _ in range(4):
        lrs.append(steps.optimizer.param_groups[0]["lr"])
        steps.optimizer.step()
        steps.step()
    assert lrs == pytest.approx([1.0, 1.0, 0.1, 0.01])


@pytest.mark.parametrize("decay_1d", [False, True])
def test_optim_decay_1d_params_decays_every_parameter_as_the_paper(tmp_path, decay_1d):
    """optim.decay_1d_params=true is the paper's weight decay on every parameter (the scales, beta, ARFA's
    parameters too); false keeps 1-D parameters undecayed. One SGD step with zero gradients."""
    from doppel.config import build_optimizer, check_config
    from tests.conftest import compose_cfg

    overrides = [f"optim.decay_1d_params={decay_1d}", "optim.lr=0.1", "optim.weight_decay=0.5", "optim.momentum=0",
                 "optim.nesterov=false"]
    factory, flag = build_optimizer(compose_cfg(tmp_path, overrides).optim)
    assert flag is decay_1d
    torch.manual_seed(0)
    module = DoppelModule(get_backbone("ie_cnn_mnist"), RecordingLoss(), factory, decay_1d_params=flag)
    optimizer = module.configure_optimizers()
    before = [p.detach().clone() for p in module.parameters()]
    assert any(p.dim() == 1 and p.abs().sum() > 0 for p in before)  # 1-D parameters that decay would move
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for old, new in zip(before, module.parameters()):
        expected = old * (1 - 0.1 * 0.5) if old.dim() > 1 or decay_1d else old
        assert torch.allclose(new, expected), old.shape
    with pytest.raises(ValueError, match="optim.decay_1d_params=maybe must be true or false"):
        check_config(compose_cfg(tmp_path, ["optim.decay_1d_params=maybe"]))
