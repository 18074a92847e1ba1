"""Loading weights from local files: the BN-Inception port's key layout, and timm weights files."""

from __future__ import annotations

import pytest
import torch

from doppel.models import get_backbone

# The Caffe port's BN-Inception (pretrainedmodels.bninception), written out from its layer names:
# conv name -> (in, out, kernel); each conv has weight + bias and a "<name>_bn" BatchNorm2d.
_INCEPTION = {  # block: (in, 1x1, 3x3 reduce, 3x3, double reduce, double, pool proj)
    "3a": (192, 64, 64, 64, 64, 96, 32), "3b": (256, 64, 64, 96, 64, 96, 64), "3c": (320, 0, 128, 160, 64, 96, 0),
    "4a": (576, 224, 64, 96, 96, 128, 128), "4b": (576, 192, 96, 128, 96, 128, 128),
    "4c": (576, 160, 128, 160, 128, 160, 128), "4d": (608, 96, 128, 192, 160, 192, 128),
    "4e": (608, 0, 128, 192, 192, 256, 0), "5a": (1056, 352, 192, 320, 160, 224, 128),
    "5b": (1024, 352, 192, 320, 192, 224, 128),
}


def port_convs() -> dict[str, tuple[int, int, int]]:
    convs = {"conv1_7x7_s2": (3, 64, 7), "conv2_3x3_reduce": (64, 64, 1), "conv2_3x3": (64, 192, 3)}
    for block, (c, one, r3, o3, rd, od, proj) in _INCEPTION.items():
        p = f"inception_{block}"
        if one:
            convs[f"{p}_1x1"] = (c, one, 1)
        convs.update({f"{p}_3x3_reduce": (c, r3, 1), f"{p}_3x3": (r3, o3, 3), f"{p}_double_3x3_reduce": (c, rd, 1),
                      f"{p}_double_3x3_1": (rd, od, 3), f"{p}_double_3x3_2": (od, od, 3)})
        if proj:
            convs[f"{p}_pool_proj"] = (c, proj, 1)
    return convs


def fabricated_port_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (cin, cout, k) in port_convs().items():
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g)
        state[f"{name}.bias"] = torch.randn(cout, generator=g)
        for stat in ("weight", "bias", "running_mean"):
            state[f"{name}_bn.{stat}"] = torch.randn(cout, generator=g)
        state[f"{name}_bn.running_var"] = torch.rand(cout, generator=g) + 0.5
    state["last_linear.weight"] = torch.randn(1000, 1024, generator=g)  # the ImageNet classifier: dropped
    state["last_linear.bias"] = torch.randn(1000, generator=g)
    return state


def test_fabricated_port_has_the_trunk_parameter_count():
    state = fabricated_port_state_dict()
    learned = sum(v.numel() for k, v in state.items() if not k.startswith("last_linear") and "running" not in k)
    assert learned == 10_270_240


def test_bn_inception_loads_the_port_layout(tmp_path):
    state = fabricated_port_state_dict()
    path = tmp_path / "bn_inception-9f5701afb96c8044.pth"
    torch.save(state, path)
    net = get_backbone("bn_inception", checkpoint=str(path))
    ours = net.trunk.state_dict()
    # Spot checks, one per kind of layer, then the whole trunk by total.
    assert torch.equal(ours["stem.0.conv.weight"], state["conv1_7x7_s2.weight"])
    assert torch.equal(ours["stem.3.bn.running_var"], state["conv2_3x3_bn.running_var"])
    assert torch.equal(ours["blocks.3a.branch_pool.1.conv.bias"], state["inception_3a_pool_proj.bias"])
    assert torch.equal(ours["blocks.4e.branch_double.2.bn.weight"], state["inception_4e_double_3x3_2_bn.weight"])
    assert torch.equal(ours["blocks.5b.branch_1x1.bn.running_mean"], state["inception_5b_1x1_bn.running_mean"])
    port_total = sum(v.double().sum() for k, v in state.items() if not k.startswith("last_linear"))
    our_total = sum(v.double().sum() for k, v in ours.items() if not k.endswith("num_batches_tracked"))
    torch.testing.assert_close(our_total, port_total)
    assert len([k for k in ours if not k.endswith("num_batches_tracked")]) == len(state) - 2


def test_bn_inception_refuses_a_partial_or_foreign_checkpoint(tmp_path):
    net = get_backbone("bn_inception")
    state = fabricated_port_state_dict()
    del state["inception_4c_3x3_bn.running_var"]
    with pytest.raises(KeyError, match="inception_4c_3x3"):
        net.trunk.map_port_state_dict(state)
    state = fabricated_port_state_dict()
    state["inception_6a_1x1.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match="inception_6a_1x1"):
        net.trunk.map_port_state_dict(state)
    with pytest.raises(ValueError, match="backbone.checkpoint"):
        get_backbone("wrn28_10", checkpoint=str(tmp_path / "x.pth"))


# -- timm --------------------------------------------------------------------------------------------
def test_timm_trunk_with_our_head():
    import timm

    net = get_backbone("timm", model="test_resnet", input_size=32, embedding_dim=64)
    reference = timm.create_model("test_resnet", num_classes=0)
    assert net.trunk.out_channels == reference.num_features
    assert sum(p.numel() for p in net.parameters()) == (sum(p.numel() for p in reference.parameters())
                                                        + reference.num_features * 64 + 64)
    assert net(torch.rand(3, 3, 40, 40) * 255).shape == (3, 64)


def test_timm_pretrained_weights_come_from_a_local_file(tmp_path, monkeypatch):
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(1)
    source = timm.create_model("test_resnet", num_classes=10)  # classifier included, as a real file has
    path = tmp_path / "test_resnet.pth"
    torch.save(source.state_dict(), path)
    net = get_backbone("timm", model="test_resnet", pretrained_path=str(path), input_size=32)
    loaded = net.trunk.model.state_dict()
    assert loaded and all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.items())
    with pytest.raises(FileNotFoundError, match="backbone.pretrained_path"):
        get_backbone("timm", model="test_resnet", pretrained_path=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="backbone.model"):
        get_backbone("timm", model="resnet_five")
