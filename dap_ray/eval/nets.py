"""Evaluation networks: a small timm-style registry of the nets the peer papers evaluate on.

``create(name, num_classes, resolution)`` builds a randomly initialised classifier that takes
(N, C, R, R) inputs and returns (N, num_classes) logits. Registered names (see ``list_nets()``):

* ``convnet``, ``convnet3`` … ``convnet6``: ConvNet-D of IDC ``models/convnet.py`` (3x3 conv, width
  128, instance norm = GroupNorm(128, 128, affine), ReLU, 2x2 average pooling, linear head on the
  flattened map). ``convnet`` picks the depth from the resolution (PROTOCOLS.md §2.1).
* ``resnetap10``: IDC ``models/resnet_ap.py`` ``ResNetAP`` depth 10, instance norm (MMX ``run.sh``
  passes ``--norm_type instance``).
* ``resnet18`` (batch norm) and ``resnet18_in`` (instance norm): IDC ``models/resnet.py`` ``ResNet``
  depth 18 with IDC's resolution-dependent stem.
* ``resnet101``, ``mobilenetv2``, ``efficientnet_b0``, ``swin``: timm, random init (the transfer nets
  of DAP Table 5; never loads pretrained weights).

Every builder accepts ``norm=`` (``instance`` / ``batch`` / ``none``) where it makes sense; extra
keyword arguments go to ``create(..., **kwargs)``.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dap_ray.errors import UserError

log = logging.getLogger(__name__)

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}

#: ImageNet channel statistics (torchvision / IDC ``data.py`` / RDED ``validation/main.py``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn(num_classes, resolution, channels, **kw) -> nn.Module`` as ``name``."""

    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn

    return deco


def list_nets() -> list[str]:
    """The registered net names, sorted."""
    return sorted(_REGISTRY)


def create(name: str, num_classes: int, resolution: int, channels: int = 3, **kwargs: object) -> nn.Module:
    """Build the net ``name`` for ``num_classes`` classes and (channels, resolution, resolution) inputs.

    Any ``convnet<D>`` (D = 1..8) is accepted besides the listed names. An unknown name raises
    :class:`dap_ray.errors.UserError` that lists the valid names.
    """
    key = name.strip().lower()
    if key in _REGISTRY:
        return _REGISTRY[key](num_classes=num_classes, resolution=resolution, channels=channels, **kwargs)
    m = re.fullmatch(r"convnet(\d)", key)
    if m and 1 <= int(m.group(1)) <= 8:
        return _build_convnet(int(m.group(1)), num_classes, resolution, channels, **kwargs)  # type: ignore[arg-type]
    raise UserError(
        f"unknown evaluation net {name!r}; valid names: {', '.join(list_nets())} (or convnet1..convnet8)"
    )


def embed(model: nn.Module, x: Tensor) -> Tensor:
    """Penultimate features (N, D) of a net built here (own nets: ``embed``; timm: pre-logits)."""
    if hasattr(model, "embed"):
        return model.embed(x)  # type: ignore[operator]
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(x), pre_logits=True)  # type: ignore[operator]
    raise TypeError(f"{type(model).__name__} has no feature extractor")


# ---------------------------------------------------------------------------------------------
# Normalisation wrapper
# ---------------------------------------------------------------------------------------------


class Normalized(nn.Module):
    """``net((x - mean) / std)``: the net takes [0, 1] images and carries its own input statistics.

    Used so that a teacher and a student can be fed the same augmented [0, 1] batch even when they
    were trained with different statistics (RDED feeds the same mixed batch to both).
    """

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:  # (N, C, H, W) in [0, 1] -> (N, K)
        return self.net((x - self.mean) / self.std)

    def embed(self, x: Tensor) -> Tensor:  # (N, C, H, W) -> (N, D)
        return embed(self.net, (x - self.mean) / self.std)


# ---------------------------------------------------------------------------------------------
# Norm layers as IDC defines them
# ---------------------------------------------------------------------------------------------


def _norm2d(kind: str, ch: int) -> nn.Module:
    """IDC ``_get_normlayer`` / ``normalization``: ``instance`` is GroupNorm(ch, ch, affine)."""
    if kind == "instance":
        return nn.GroupNorm(ch, ch, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "group":
        return nn.GroupNorm(4, ch, affine=True)
    if kind == "none":
        return nn.Identity()
    raise UserError(f"norm={kind!r} is not valid: use instance, batch, group or none")


# ---------------------------------------------------------------------------------------------
# ConvNet-D (IDC models/convnet.py)
# ---------------------------------------------------------------------------------------------


def convnet_depth_for_resolution(resolution: int) -> int:
    """Depth of ``convnet`` at a resolution: the conventions of the code in PROTOCOLS.md §2.1.

    ConvNet-3 at <= 32 px (IDC ``misc/reproduce.py``), Conv4 at <= 64 px and Conv5 at <= 128 px
    (RDED ``README.md`` observer table), ConvNet-6 above (IGD ``train.py`` ``convnet6`` at 224/256).
    Every choice leaves a final map of at least 4x4 (3x3 at 224 px), as in those codebases.
    """
    if resolution <= 32:
        return 3
    if resolution <= 64:
        return 4
    if resolution <= 128:
        return 5
    return 6


def _max_convnet_depth(resolution: int) -> int:
    """Deepest ConvNet allowed at ``resolution``.

    Below 128 px the depth follows :func:`convnet_depth_for_resolution` (final map >= 4x4); from
    128 px up any depth that leaves at least a 2x2 map (ConvNet-6 @128 -> 2x2, @224 -> 3x3).
    """
    if resolution < 128:
        return convnet_depth_for_resolution(resolution)
    return max(1, int(math.floor(math.log2(resolution))) - 1)


class ConvNet(nn.Module):
    """ConvNet-D, IDC ``models/convnet.py`` (copied by MMX ``train_models/convnet.py``).

    Per block: Conv 3x3 s1 p1 (bias) -> norm -> ReLU -> AvgPool 2x2 s2; head: flatten the
    C x H_D x W_D map (no global pooling) -> Linear.
    """

    def __init__(
        self,
        num_classes: int,
        depth: int = 3,
        width: int = 128,
        norm: str = "instance",
        channels: int = 3,
        resolution: int = 32,
    ):
        super().__init__()
        self.depth = depth
        layers: list[nn.Module] = []
        c_in, size = channels, resolution
        for _ in range(depth):
            layers += [
                nn.Conv2d(c_in, width, kernel_size=3, padding=1),
                _norm2d(norm, width),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(kernel_size=2, stride=2),
            ]
            c_in, size = width, size // 2  # spatial size floors at each halving
        self.features = nn.Sequential(*layers)
        self.num_features = width * size * size
        self.classifier = nn.Linear(self.num_features, num_classes)

    def embed(self, x: Tensor) -> Tensor:  # (N, C, R, R) -> (N, width * (R / 2^D)^2)
        return self.features(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:  # (N, C, R, R) -> (N, K)
        return self.classifier(self.embed(x))


def _build_convnet(
    depth: int | None, num_classes: int, resolution: int, channels: int = 3, **kw: object
) -> ConvNet:
    """ConvNet of ``depth`` (None: by resolution), reduced with a logged note when it does not fit."""
    if depth is None:
        depth = convnet_depth_for_resolution(resolution)
    else:
        cap = _max_convnet_depth(resolution)
        if depth > cap:
            log.info(
                "convnet%d does not fit %d px inputs; using ConvNet-%d (depth follows resolution, "
                "PROTOCOLS.md §2.1)",
                depth,
                resolution,
                cap,
            )
            depth = cap
    return ConvNet(num_classes, depth=depth, channels=channels, resolution=resolution, **kw)  # type: ignore[arg-type]


@register("convnet")
def convnet(num_classes: int, resolution: int, channels: int = 3, **kw: object) -> nn.Module:
    """ConvNet with depth by resolution: 3 @<=32, 4 @<=64, 5 @<=128, 6 above."""
    return _build_convnet(None, num_classes, resolution, channels, **kw)


for _d in (3, 4, 5, 6):

    def _make(d: int) -> Builder:
        def build(num_classes: int, resolution: int, channels: int = 3, **kw: object) -> nn.Module:
            return _build_convnet(d, num_classes, resolution, channels, **kw)

        build.__doc__ = f"ConvNet-{d} (IDC ``models/convnet.py``), reduced below its resolution."
        return build

    register(f"convnet{_d}")(_make(_d))


# ---------------------------------------------------------------------------------------------
# ResNetAP-10 (IDC models/resnet_ap.py) and ResNet-18 (IDC models/resnet.py)
# ---------------------------------------------------------------------------------------------


def _stem_size(resolution: int) -> str:
    """IDC ``ResNet``/``ResNetAP``: ``small`` <= 64 px, ``mid`` 65..128 px, ``large`` above."""
    if resolution <= 64:
        return "small"
    if resolution <= 128:
        return "mid"
    return "large"


def _idc_init(model: nn.Module) -> None:
    """IDC init: conv weights N(0, 2 / (k*k*C_out)); norm weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _BasicBlockAP(nn.Module):
    """IDC ``resnet_ap.BasicBlock``: stride-1 convs; down-sampling by 2x2 avg pool after conv1."""

    def __init__(self, c_in: int, c_out: int, norm: str, stride: int = 1):
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1, bias=bias)
        self.bn1 = _norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=bias)
        self.bn2 = _norm2d(norm, c_out)
        self.stride = stride
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            # shortcut: conv 1x1 s1 -> AvgPool(stride) -> norm (IDC ``ResNetAP._make_layer``)
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, 1, 0, bias=bias),
                nn.AvgPool2d(kernel_size=stride, stride=stride),
                _norm2d(norm, c_out),
            )

    def forward(self, x: Tensor) -> Tensor:  # (N, C_in, H, W) -> (N, C_out, H/s, W/s)
        out = F.relu(self.bn1(self.conv1(x)))
        if self.stride != 1:
            out = F.avg_pool2d(out, kernel_size=self.stride, stride=self.stride)
        out = self.bn2(self.conv2(out))
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(out + res)


class _BasicBlock(nn.Module):
    """IDC ``resnet.BasicBlock`` (torchvision layout): strided 3x3 conv, 1x1 strided conv shortcut."""

    def __init__(self, c_in: int, c_out: int, norm: str, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = _norm2d(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = _norm2d(norm, c_out)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False), _norm2d(norm, c_out)
            )

    def forward(self, x: Tensor) -> Tensor:  # (N, C_in, H, W) -> (N, C_out, H/s, W/s)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        res = x if self.downsample is None else self.downsample(x)
        return F.relu(out + res)


class _IDCResNet(nn.Module):
    """Shared body of IDC ``ResNet`` / ``ResNetAP`` (ImageNet branch, BasicBlocks, width 64).

    ``ap=True``: ResNetAP (every down-sampling is 2x2 average pooling, stem pools with AvgPool);
    ``ap=False``: ResNet (strided convs, stem pools with MaxPool 3x3 s2).
    Stems (IDC ``IntroBlock``, chosen by :func:`_stem_size`):

    * ``small`` (<= 64 px): conv 3x3 s1 -> norm -> ReLU, no pooling. This is the CIFAR-style stem
      (no 7x7 s2 conv, no max-pool), so 32/64 px inputs keep their resolution in layer1.
    * ``mid`` (65..128 px): conv 3x3 s1 -> norm -> ReLU -> pool (AP: AvgPool 2x2; ResNet: MaxPool 3x3 s2).
    * ``large`` (> 128 px): AP: conv 7x7 s1 -> norm -> ReLU -> AvgPool 4x4 s4;
      ResNet: conv 7x7 s2 -> norm -> ReLU -> MaxPool 3x3 s2 p1.

    Head: global average pool over the whole map -> Linear(512, K).
    """

    def __init__(
        self,
        num_classes: int,
        blocks: tuple[int, int, int, int],
        ap: bool,
        norm: str,
        resolution: int,
        channels: int = 3,
        width: float = 1.0,
    ):
        super().__init__()
        size = _stem_size(resolution)
        c0 = int(64 * width)
        bias = ap and norm == "none"
        stem: list[nn.Module]
        if size == "large":
            conv = nn.Conv2d(channels, c0, 7, 1 if ap else 2, 3, bias=bias)
            pool: nn.Module = nn.AvgPool2d(4, 4) if ap else nn.MaxPool2d(3, 2, 1)
            stem = [conv, _norm2d(norm, c0), nn.ReLU(inplace=True), pool]
        else:
            conv = nn.Conv2d(channels, c0, 3, 1, 1, bias=bias)
            stem = [conv, _norm2d(norm, c0), nn.ReLU(inplace=True)]
            if size == "mid":
                stem.append(nn.AvgPool2d(2, 2) if ap else nn.MaxPool2d(3, 2, 1))
        self.stem_size = size
        self.layer0 = nn.Sequential(*stem)
        block = _BasicBlockAP if ap else _BasicBlock
        stages: list[nn.Module] = []
        c_in = c0
        for i, n in enumerate(blocks):
            c_out = c0 * 2**i
            seq = [block(c_in, c_out, norm, stride=1 if i == 0 else 2)]
            seq += [block(c_out, c_out, norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*seq))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = c_in
        self.fc = nn.Linear(c_in, num_classes)
        _idc_init(self)

    def embed(self, x: Tensor) -> Tensor:  # (N, C, R, R) -> (N, 512)
        x = self.layer0(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))  # = F.avg_pool2d(x, x.shape[-1]) for square maps

    def forward(self, x: Tensor) -> Tensor:  # (N, C, R, R) -> (N, K)
        return self.fc(self.embed(x))


@register("resnetap10")
def resnetap10(
    num_classes: int, resolution: int, channels: int = 3, norm: str = "instance", width: float = 1.0
) -> nn.Module:
    """IDC ResNetAP-10 (``models/resnet_ap.py``, depth 10 = blocks [1,1,1,1]), instance norm."""
    return _IDCResNet(num_classes, (1, 1, 1, 1), True, norm, resolution, channels, width)


@register("resnet18")
def resnet18(num_classes: int, resolution: int, channels: int = 3, norm: str = "batch") -> nn.Module:
    """IDC ResNet-18 (``models/resnet.py``, blocks [2,2,2,2]), batch norm by default.

    Batch norm follows IDC ``test.py`` (``resnet18_bn`` for ImageNet) and RDED/D3HR (torchvision
    ``resnet18``); at > 128 px the layout equals torchvision's ResNet-18. ``resnet18_in`` is the
    instance-norm variant (MMX ``--norm_type instance``); which one IGD/DAP used is not stated
    (PROTOCOLS.md §7 Q4). At <= 64 px the stem is the CIFAR-style 3x3 s1 conv without max-pool.
    """
    return _IDCResNet(num_classes, (2, 2, 2, 2), False, norm, resolution, channels)


@register("resnet18_in")
def resnet18_in(num_classes: int, resolution: int, channels: int = 3) -> nn.Module:
    """IDC ResNet-18 with instance norm (GroupNorm(C, C)), as MMX's ``--norm_type instance`` gives."""
    return _IDCResNet(num_classes, (2, 2, 2, 2), False, "instance", resolution, channels)


# ---------------------------------------------------------------------------------------------
# Transfer nets via timm (random init, never pretrained)
# ---------------------------------------------------------------------------------------------


def _timm(model_name: str, num_classes: int, channels: int, **kw: object) -> nn.Module:
    import timm  # deferred: importing timm costs ~1 s

    return timm.create_model(model_name, pretrained=False, num_classes=num_classes, in_chans=channels, **kw)


@register("resnet101")
def resnet101(num_classes: int, resolution: int, channels: int = 3, **kw: object) -> nn.Module:
    """timm ``resnet101`` (torchvision layout), random init; any input size (global pooling)."""
    return _timm("resnet101", num_classes, channels, **kw)


@register("mobilenetv2")
def mobilenetv2(num_classes: int, resolution: int, channels: int = 3, **kw: object) -> nn.Module:
    """timm ``mobilenetv2_100`` (MobileNet-V2, width 1.0), random init."""
    return _timm("mobilenetv2_100", num_classes, channels, **kw)


@register("efficientnet_b0")
def efficientnet_b0(num_classes: int, resolution: int, channels: int = 3, **kw: object) -> nn.Module:
    """timm ``efficientnet_b0``, random init."""
    return _timm("efficientnet_b0", num_classes, channels, **kw)


def swin_window_size(resolution: int, patch: int = 4, stages: int = 4, max_window: int = 8) -> int:
    """Largest window <= ``max_window`` that tiles every Swin stage map that is larger than it.

    Stage maps are R/4, R/8, R/16, R/32; timm shrinks the window to the map when the map is no
    larger than the window. Gives 8 at 32/64/128/256 px and 7 at 224 px (the usual Swin-T).
    """
    maps = [resolution // (patch * 2**i) for i in range(stages)]
    for w in range(max_window, 0, -1):
        if all(m <= w or m % w == 0 for m in maps):
            return w
    return 1


@register("swin")
def swin(num_classes: int, resolution: int, channels: int = 3, **kw: object) -> nn.Module:
    """Swin-V2-Tiny via timm (``swinv2_tiny_window8_256`` config), random init.

    RDED/D3HR evaluate Swin-V2-T (PROTOCOLS.md §2.3), hence V2-Tiny: patch 4, embed 96, depths
    (2, 2, 6, 2). timm's config is fixed to 256 px, so it is rebuilt with ``img_size=resolution``
    and ``window_size=swin_window_size(resolution)`` (8 at 32/64/128/256 px, 7 at 224 px). The
    resolution must be a multiple of 32 (four patch-merging stages).
    """
    if resolution % 32:
        raise UserError(f"swin needs a resolution that is a multiple of 32, got {resolution}")
    kw.setdefault("window_size", swin_window_size(resolution))
    return _timm("swinv2_tiny_window8_256", num_classes, channels, img_size=resolution, **kw)
