"""Evaluation nets: registry, output shapes at 32/64/128/256 px, IDC layouts (PROTOCOLS.md §2)."""

from __future__ import annotations

import logging

import pytest
import torch

from dap_ray.errors import UserError
from dap_ray.eval import nets

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on the shared 2-core machine this is faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


RESOLUTIONS = (32, 64, 128, 256)
TIMM_NETS = {"resnet101", "mobilenetv2", "efficientnet_b0", "swin"}
EXPECTED = {
    "convnet",
    "convnet3",
    "convnet4",
    "convnet5",
    "convnet6",
    "resnetap10",
    "resnet18",
    "resnet18_in",
} | TIMM_NETS


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_lists_every_net():
    assert set(nets.list_nets()) == EXPECTED
    assert nets.list_nets() == sorted(nets.list_nets())


@pytest.mark.parametrize("res", RESOLUTIONS)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_output_shape(name: str, res: int):
    torch.manual_seed(0)
    model = nets.create(name, num_classes=7, resolution=res).eval()
    # big timm nets at >= 128 px: one image keeps the test at about a second on 2 CPU cores
    n = 1 if name in TIMM_NETS and res >= 128 else 2
    with torch.no_grad():
        out = model(torch.rand(n, 3, res, res))  # (n, 3, R, R) -> (n, 7)
    assert out.shape == (n, 7)
    assert torch.isfinite(out).all()


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as err:
        nets.create("vgg11", 10, 32)
    msg = str(err.value)
    assert "vgg11" in msg
    for name in EXPECTED:
        assert name in msg


def test_bad_norm_is_user_error():
    with pytest.raises(UserError, match="norm"):
        nets.create("resnetap10", 10, 32, norm="layerwise")


@pytest.mark.parametrize(
    ("res", "depth", "feat"), [(32, 3, 4), (64, 4, 4), (128, 5, 4), (256, 6, 4), (224, 6, 3)]
)
def test_convnet_depth_follows_resolution(res: int, depth: int, feat: int):
    model = nets.create("convnet", 10, res)
    assert model.depth == depth
    assert model.num_features == 128 * feat * feat  # ConvNet-3 @32 -> 2048-d (PROTOCOLS §2.1)
    assert model.embed(torch.rand(2, 3, res, res)).shape == (2, 128 * feat * feat)


def test_convnet6_is_reduced_below_128px_with_a_log(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="dap_ray.eval.nets"):
        small = nets.create("convnet6", 10, 64)
    assert small.depth == 4
    assert any("convnet6" in r.getMessage() and "ConvNet-4" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dap_ray.eval.nets"):
        full = nets.create("convnet6", 10, 128)
    assert full.depth == 6 and full.num_features == 128 * 2 * 2
    assert not caplog.records
    assert nets.create("convnet6", 10, 32).depth == 3
    assert nets.create("convnet2", 10, 32).depth == 2  # any convnet<D> is accepted


def test_convnet_layout_matches_idc():
    """IDC models/convnet.py: conv(bias) -> GroupNorm(128, 128) -> ReLU -> AvgPool 2x2, per block."""
    model = nets.create("convnet6", 10, 224)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Conv2d", "GroupNorm", "ReLU", "AvgPool2d"] * 6
    gn = model.features[1]
    assert gn.num_groups == 128 and gn.num_channels == 128 and gn.affine
    assert model.features[0].bias is not None
    # ConvNet-6 @224 has about 0.755 M parameters at 10 classes (PROTOCOLS §2.1, derived)
    assert abs(_params(model) - 0.755e6) < 0.01e6


def test_resnetap10_layout_matches_idc():
    """IDC ResNetAP-10: no strided convs, avg-pool down-sampling, instance norm, ~4.91 M params."""
    model = nets.create("resnetap10", 10, 224)
    assert model.stem_size == "large"
    assert all(m.stride == (1, 1) for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert abs(_params(model) - 4.91e6) < 0.01e6  # PROTOCOLS §2.2 (derived)
    x = torch.rand(1, 3, 224, 224)
    assert model.layer0(x).shape == (1, 64, 56, 56)  # table in PROTOCOLS §2.2
    assert nets.create("resnetap10", 10, 128).stem_size == "mid"
    assert nets.create("resnetap10", 10, 64).stem_size == "small"


def test_resnet18_variants():
    bn = nets.create("resnet18", 10, 224)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bn.modules())
    assert abs(_params(bn) - 11.18e6) < 0.02e6  # torchvision ResNet-18 body + 10-way head
    inorm = nets.create("resnet18_in", 10, 224)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in inorm.modules())
    # <= 64 px: CIFAR-style 3x3 s1 stem, no max-pool
    small = nets.create("resnet18", 10, 32)
    assert small.stem_size == "small"
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in small.modules())
    assert small.layer0(torch.rand(2, 3, 32, 32)).shape == (2, 64, 32, 32)


@pytest.mark.parametrize(("res", "window"), [(32, 8), (64, 8), (128, 8), (224, 7), (256, 8)])
def test_swin_window_size(res: int, window: int):
    assert nets.swin_window_size(res) == window


def test_swin_rejects_odd_resolution():
    with pytest.raises(UserError, match="multiple of 32"):
        nets.create("swin", 10, 100)


def test_embed_and_normalized_wrapper():
    net = nets.create("resnetap10", 5, 32)
    wrapped = nets.Normalized(net, nets.IMAGENET_MEAN, nets.IMAGENET_STD).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert nets.embed(wrapped, x).shape == (2, 512)
        mean = torch.tensor(nets.IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(nets.IMAGENET_STD).view(1, 3, 1, 1)
        assert torch.allclose(wrapped(x), net.eval()((x - mean) / std))
    timm_net = nets.create("mobilenetv2", 5, 32).eval()
    with torch.no_grad():
        assert nets.embed(timm_net, x).shape == (2, timm_net.num_features)


def test_channels_argument():
    for name in ("convnet", "resnetap10", "resnet18", "mobilenetv2"):
        model = nets.create(name, 4, 32, channels=1).eval()
        with torch.no_grad():
            assert model(torch.rand(2, 1, 32, 32)).shape == (2, 4)
