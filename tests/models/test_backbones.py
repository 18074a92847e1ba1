"""Every backbone against its published figures: parameter counts, shapes, gradients, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from doppel.data.transforms import Preprocess
from doppel.losses.prototype import Softmax
from doppel.models import BACKBONES, get_backbone


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- parameter counts of the public references named by the issue --------------------------------------
def test_bn_inception_matches_the_caffe_port_and_sec_head():
    net = get_backbone("bn_inception")
    assert n_params(net.trunk) == 10_270_240
    assert n_params(net) == 10_797_088  # + BatchNorm1d(1024) + Linear(1024, 512)


def test_resnet50_ir_matches_insightface_iresnet50():
    net = get_backbone("resnet50_ir")
    assert n_params(net) == 43_590_848
    assert not net.head.post_bn.weight.requires_grad  # insightface freezes the feature BN's scale


def test_se_resnet50_ir_matches_ir_se_50():
    assert n_params(get_backbone("se_resnet50_ir")) == 43_797_696


@pytest.mark.parametrize(("classes", "expected"), [(10, 36_479_194), (100, 36_536_884)])
def test_wrn28_10_with_a_softmax_classifier(classes, expected):
    net = get_backbone("wrn28_10")
    assert net.embedding_dim == 640
    assert n_params(net) + n_params(Softmax(640, classes)) == expected


# The IE paper's Table 1, written out: (conv0 width or None, [(layers, width)] x 3, kernel, FC width, in).
IE_TABLE_1 = {
    "ie_cnn_mnist": (64, [(3, 64), (3, 64), (3, 64)], 3, 256, 1, 28),
    "ie_cnn_mnist_2d": (None, [(2, 32), (2, 64), (2, 128)], 5, 2, 1, 28),
    "ie_cnn_cifar10": (64, [(4, 64), (4, 96), (4, 128)], 3, 256, 3, 32),
    "ie_cnn_cifar100": (96, [(4, 96), (4, 192), (4, 384)], 3, 512, 3, 32),
}


@pytest.mark.parametrize("name", sorted(IE_TABLE_1))
def test_ie_cnn_parameters_follow_table_1(name):
    conv0, groups, kernel, fc, channels, size = IE_TABLE_1[name]
    expected, c = 0, channels
    layers = ([(3, conv0)] if conv0 else []) + [(kernel, w) for count, w in groups for _ in range(count)]
    for k, width in layers:
        expected += k * k * c * width + 3 * width  # conv (no bias: BN follows) + BN scale, shift + PReLU
        c = width
    side = size // 2 // 2 // 2  # three 2x2/2 max-pools
    expected += side * side * c * fc + fc  # the fully connected layer
    net = get_backbone(name)
    assert n_params(net) == expected
    assert net(torch.rand(2, 3, 40, 40) * 255).shape == (2, fc)  # resized to the table's input
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == len(layers)


# Table 5 of the IE paper: (layer, output H x W x C, conv layers, parameters as printed, in K).
IE_TABLE_5 = [
    ("Conv0", (110, 94, 32), 1, 0.86), ("Conv1", (108, 92, 64), 1, 18), ("Pool1", (54, 46, 64), 0, None),
    ("Resblock1", (54, 46, 64), 2, 73), ("Conv2", (52, 44, 128), 1, 73), ("Pool2", (26, 22, 128), 0, None),
    ("Resblock2", (26, 22, 128), 2, 294), ("Resblock3", (26, 22, 128), 2, 294),
    ("Conv3", (24, 20, 256), 1, 294), ("Pool3", (12, 10, 256), 0, None),
    *[(f"Resblock{i}", (12, 10, 256), 2, 1179) for i in range(4, 9)],
    ("Conv4", (10, 8, 512), 1, 1179), ("Pool4", (5, 4, 512), 0, None),
    *[(f"Resblock{i}", (5, 4, 512), 2, 4718) for i in range(9, 12)],
]


def _table5_units(net) -> list[nn.Module]:
    """The trunk's modules in the table's row order: conv units (conv + act), pools, resblocks."""
    units, pending = [], None
    for module in net.trunk.features:
        if isinstance(module, nn.Conv2d):
            pending = module
        elif isinstance(module, (nn.ReLU, nn.PReLU)) and pending is not None:
            units.append(module)
            pending = None
        elif not isinstance(module, nn.BatchNorm2d):
            units.append(module)
    return units


def test_ie_face_resnet_follows_table_5_layer_by_layer():
    net = get_backbone("ie_face_resnet")
    units = _table5_units(net)
    assert len(units) == len(IE_TABLE_5)
    shapes: list[tuple[int, ...]] = []
    hooks = [u.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:]))) for u in units]
    with torch.no_grad():
        out = net.eval()(torch.rand(1, 3, 112, 96) * 255)
    for h in hooks:
        h.remove()
    assert out.shape == (1, 512)
    conv_layers = 0
    row_params = []
    convs = [m for m in net.trunk.features.modules() if isinstance(m, nn.Conv2d)]
    for (layer, (h, w, c), depth, printed), shape in zip(IE_TABLE_5, shapes):
        assert shape == (c, h, w), layer
        row_params.append((depth, printed))
    for depth, printed in row_params:
        weights = sum(m.weight.numel() for m in convs[conv_layers:conv_layers + depth])
        conv_layers += depth
        if printed is not None:  # the table truncates to thousands (0.86K = 864)
            assert math.floor(weights / 10) / 100 == printed if printed < 1 else weights // 1000 == printed
    assert conv_layers == len(convs) == 27
    assert net.head.fc.weight.numel() // 1000 == 5242 and net.head.fc.bias is None  # Fc5


def test_ie_face_resnet_powerful_variant_doubles_conv1_to_resblock8():
    wide = get_backbone("ie_face_resnet", width=2)
    widths = [m.out_channels for m in wide.trunk.features.modules() if isinstance(m, nn.Conv2d)]
    assert widths[:2] == [32, 128] and widths[2:4] == [128, 128] and widths[4] == 256
    assert set(widths[10:20]) == {512} and widths[20:] == [512] * 7  # Resblock4-8 (2x256), Conv4, Resblock9-11


def test_face_resnet_small_is_the_same_code_narrower():
    full, small = get_backbone("face_resnet"), get_backbone("face_resnet", input_size=32, stem_channels=16,
                                                              stem_stride=1, widths=[32, 64, 128, 256],
                                                              depths=[1, 1, 2, 1], padding="same",
                                                              embedding_dim=128, batch_norm=True)
    assert type(full.trunk) is type(small.trunk) and n_params(small) < n_params(full) / 50


# -- behaviour shared by every backbone ---------------------------------------------------------------
PAPER_SIZES = {name: spec.input_size for name, spec in BACKBONES.items() if name != "timm"}


def _first_conv(net: nn.Module) -> nn.Conv2d:
    return next(m for m in net.trunk.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_paper_input_size_shape_gradient_and_determinism(name):
    torch.manual_seed(0)
    net = get_backbone(name)
    h, w = PAPER_SIZES[name]
    images = torch.rand(2, 3, h, w) * 255
    net.train()
    out = net(images)
    assert out.shape == (2, net.embedding_dim)
    out.square().sum().backward()
    grad = _first_conv(net).weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    net.eval()
    with torch.no_grad():
        first, second = net(images), net(images)
    assert torch.equal(first, second)
    torch.manual_seed(0)
    again = get_backbone(name).eval()
    again.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.equal(again(images), first)


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match="backbone.input_size"):
        get_backbone("ie_face_resnet", input_size=[40, 40])
    with pytest.raises(ValueError, match="backbone.name"):
        get_backbone("resnet51")


def test_channels_last_gives_the_same_embedding():
    torch.manual_seed(0)
    net = get_backbone("resnet50_ir", input_size=32).eval()
    images = torch.rand(2, 3, 32, 32) * 255
    with torch.no_grad():
        reference = net(images)
        net.to_channels_last()
        torch.testing.assert_close(net(images), reference, rtol=1e-4, atol=1e-4)


# -- preprocessing ------------------------------------------------------------------------------------
def test_preprocess_styles_by_hand():
    pixel = torch.tensor([10.0, 20.0, 30.0]).view(1, 3, 1, 1)  # R, G, B
    caffe = Preprocess((1, 1), "caffe_bgr")(pixel).flatten().tolist()
    assert caffe == [30 - 104, 20 - 117, 10 - 128]  # B, G, R minus the Caffe mean
    assert Preprocess((1, 1), "centered")(pixel).flatten().tolist() == [(v - 127.5) / 128 for v in (10, 20, 30)]
    torch.testing.assert_close(Preprocess((1, 1), "unit")(pixel).flatten(),
                               torch.tensor([(v - 127.5) / 127.5 for v in (10.0, 20.0, 30.0)]))
    imagenet = Preprocess((1, 1), "imagenet")(pixel).flatten()
    torch.testing.assert_close(imagenet, torch.tensor([(10 / 255 - 0.485) / 0.229, (20 / 255 - 0.456) / 0.224,
                                                       (30 / 255 - 0.406) / 0.225]))
    gray = Preprocess((1, 1), "centered", channels=1)(pixel)
    assert gray.shape == (1, 1, 1, 1)
    torch.testing.assert_close(gray.flatten(), torch.tensor([(0.299 * 10 + 0.587 * 20 + 0.114 * 30 - 127.5) / 128]))
    with pytest.raises(ValueError, match="backbone.preprocess"):
        Preprocess((1, 1), "bgr")


def test_preprocess_resizes_to_the_network_input():
    images = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4)
    up = Preprocess((8, 6), "centered")(images)
    assert up.shape == (1, 3, 8, 6)
    constant = Preprocess((7, 9), "centered")(torch.full((2, 3, 32, 32), 127.5))
    assert constant.shape == (2, 3, 7, 9) and constant.abs().max() < 1e-6


@pytest.mark.parametrize("name", sorted(set(PAPER_SIZES) - {"ie_cnn_mnist_2d"}))
def test_config_file_builds_the_registry_network(name):
    """configs/backbone/<name>.yaml and get_backbone(name) are the same network (no drift)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from doppel.train import CONFIG_DIR

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"backbone={name}"])
    from_config, from_code = instantiate(cfg.backbone, image_size=32), get_backbone(name)
    assert from_config.input_size == from_code.input_size
    assert from_config.preprocess.extra_repr() == from_code.preprocess.extra_repr()
    assert [(k, v.shape) for k, v in from_config.state_dict().items()] == \
        [(k, v.shape) for k, v in from_code.state_dict().items()]
    assert [p.requires_grad for p in from_config.parameters()] == [p.requires_grad for p in from_code.parameters()]


def test_wrn_dropout_is_its_block_dropout_and_ir_dropout_is_the_heads():
    wrn = get_backbone("wrn28_10", depth=10, widen_factor=1, dropout=0.3)
    assert {block.dropout for block in wrn.trunk.blocks} == {0.3}
    assert isinstance(wrn.head.dropout, torch.nn.Identity)
    ir = get_backbone("resnet50_ir", input_size=32, dropout=0.2)
    assert isinstance(ir.head.dropout, torch.nn.Dropout) and ir.head.dropout.p == 0.2
    from doppel.config import CONFIG_DIR

    cfg = OmegaConf.load(CONFIG_DIR / "backbone" / "wrn28_10.yaml")
    cfg.depth, cfg.widen_factor, cfg.dropout = 10, 1, 0.4  # backbone=wrn28_10 backbone.dropout=0.4
    assert {block.dropout for block in instantiate(cfg).trunk.blocks} == {0.4}


def test_an_unknown_backbone_option_is_named_with_the_nearest_one():
    with pytest.raises(ValueError, match=r"backbone.dropuot is not an option of backbone 'face_resnet' "
                                         r"\(did you mean dropout\?\)"):
        get_backbone("face_resnet", dropuot=0.1)
    with pytest.raises(ValueError, match=r"backbone.embedding_dim=0 must be a positive integer"):
        get_backbone("face_resnet", embedding_dim=0)
