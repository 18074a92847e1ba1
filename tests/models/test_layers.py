import itertools

import pytest
import torch

from doppel.models import get_backbone
from doppel.models.layers import ARFA, Maxout, lsuv_init_


def naive_arfa(x, a, k):
    out = torch.empty_like(x)
    for idx in itertools.product(*(range(n) for n in x.shape)):
        value, channel_a = x[idx], a[idx[1]]
        out[idx] = k * value if value > 0 else k * value / (channel_a - value)
    return out


def test_arfa_matches_eq1():
    layer = ARFA(3, a_init=0.7).double()
    layer.k.fill_(1.3)
    with torch.no_grad():
        layer.raw_a.add_(torch.tensor([0.0, 0.5, -0.2], dtype=torch.float64))
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 3
    assert torch.allclose(layer(x), naive_arfa(x, layer.a.detach(), 1.3))
    assert torch.allclose(layer.a[0], torch.tensor(0.7, dtype=torch.float64))


def test_arfa_gradcheck_float64():
    layer = ARFA(3, a_init=0.8).double()
    layer.k.fill_(1.7)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    raw_a = (layer.raw_a.detach() + torch.tensor([0.0, 0.3, -0.4], dtype=torch.float64)).requires_grad_(True)

    def arfa(inputs, raw):
        return torch.func.functional_call(layer, {"raw_a": raw}, (inputs,))

    # gradients with respect to the input and to the channel-wise a, both sides of zero
    assert torch.autograd.gradcheck(arfa, (x, raw_a))


def test_arfa_a_stays_positive_under_large_negative_updates():
    layer = ARFA(2)
    with torch.no_grad():
        layer.raw_a.fill_(-50.0)
    assert (layer.a > 0).all()
    assert torch.isfinite(layer(torch.tensor([[-1e-3, -5.0]]))).all()


def test_maxout():
    x = torch.tensor([[1.0, 3.0, -2.0, -5.0]])
    assert Maxout(2)(x).tolist() == [[3.0, -2.0]]
    with pytest.raises(ValueError, match="maxout"):
        Maxout(3)(x)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_lsuv_gives_unit_variance_at_every_arfa(batch_norm):
    torch.manual_seed(0)
    model = get_backbone("face_resnet", input_size=16, stem_channels=8, stem_stride=1, widths=(8, 16, 16, 16),
                         depths=(1, 1, 1, 1), padding="same", embedding_dim=8, batch_norm=batch_norm)
    batch = torch.rand(32, 3, 16, 16) * 255
    variances = lsuv_init_(model, batch)
    n_arfa = sum(isinstance(m, ARFA) for m in model.modules())
    assert len(variances) == n_arfa
    assert all(abs(v - 1) < 0.05 for v in variances), variances
    ks = [m.k.item() for m in model.modules() if isinstance(m, ARFA)]
    assert len(set(round(k, 6) for k in ks)) > 1  # fitted per layer, not one global value
    assert not any(p is m.k for m in model.modules() if isinstance(m, ARFA) for p in model.parameters())


def test_face_resnet_full_size_matches_table1():
    model = get_backbone("face_resnet")  # paper defaults
    sizes = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[1:])))
             for m in model.trunk.features if isinstance(m, torch.nn.MaxPool2d) or m.__class__.__name__ in
             ("ResBlock", "DilatedConcat")]
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 259, 259))
    for h in hooks:
        h.remove()
    assert out.shape == (1, 512)
    # Table 1, rows after the stem: (C, H, W)
    assert sizes == [
        (64, 62, 62), (128, 62, 62), (256, 60, 60), (256, 30, 30), (256, 30, 30), (256, 30, 30),
        (512, 28, 28), (512, 14, 14), *[(512, 14, 14)] * 5, (1024, 12, 12), (1024, 6, 6), *[(1024, 6, 6)] * 3,
    ]
    assert model.head.fc.in_features == 6 * 6 * 1024 and model.head.fc.out_features == 1024
