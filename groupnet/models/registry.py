"""The model zoo's names: parse an arch name into its unsplit :class:`ArchSpec`, divide it, build it.

Names (the UNSPLIT network; ``branches=K`` divides it):

- ``small_cnn``: a small conv net for scikit-learn's 8x8 digits.
- ``resnet{D}``: CIFAR ResNet, basic blocks for D = 6n+2 below 164 (20, 32, 44, 56, 110), bottleneck for D = 9n+2
  from 164 on (164).
- ``wrn-{D}-{k}``: Wide ResNet, D = 6n+4 (wrn-16-4, wrn-16-8, wrn-28-10, wrn-40-10).
- ``resnext{D}-{C}x{W}d``: CIFAR ResNeXt, D = 9n+2 (resnext29-8x64d, resnext29-16x64d).
- ``pkg.module:Class``: the user's own plain model, built K times and stacked (:mod:`groupnet.models.imported`).
- ``splitnet-wrn-{D}-{k}``, ``splitnet-resnet{D}`` (bottleneck, D = 9n+2), ``splitnet-resnext{D}-{C}x{W}d``: the
  networks exactly as the official SplitNet code defines them (post-activation, ResNet-D shortcuts, zero-init;
  :mod:`groupnet.models.splitnet_resnet`), the ones its paper's tables report.
- ``mobilenetv2_tiny``: a tiny MobileNetV2 (inverted bottlenecks, depthwise convs) for the 8x8 digits.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from groupnet.models.base import GroupedClassifier
from groupnet.models.divide import divide as divide_spec
from groupnet.models.imported import build_imported, is_import_path
from groupnet.models.mobilenetv2 import MobileNetV2, mobilenetv2_tiny_spec
from groupnet.models.resnet import CifarResNet, resnet_spec
from groupnet.models.resnext import resnext_spec
from groupnet.models.small_cnn import SmallCNN, small_cnn_spec
from groupnet.models.spec import ArchSpec
from groupnet.models.splitnet_resnet import (
    SPLITNET_FAMILIES,
    SplitNetResNet,
    splitnet_resnet_spec,
    splitnet_resnext_spec,
    splitnet_wrn_spec,
)
from groupnet.models.wrn import WideResNet, wrn_spec

FAMILY_CLASSES: dict[str, type[GroupedClassifier]] = {
    "small_cnn": SmallCNN,
    "resnet": CifarResNet,
    "resnext": CifarResNet,
    "wrn": WideResNet,
    "mobilenetv2": MobileNetV2,
    **{family: SplitNetResNet for family in SPLITNET_FAMILIES},
}

_PATTERNS: list[tuple[re.Pattern, Callable[..., ArchSpec]]] = [
    (re.compile(r"small[_-]cnn"), lambda: small_cnn_spec()),
    (re.compile(r"mobilenetv2[_-]tiny"), lambda: mobilenetv2_tiny_spec()),
    (re.compile(r"resnet(\d+)"), lambda d: resnet_spec(int(d))),
    (re.compile(r"wrn-(\d+)-(\d+)"), lambda d, k: wrn_spec(int(d), int(k))),
    (re.compile(r"resnext(\d+)-(\d+)x(\d+)d"), lambda d, c, w: resnext_spec(int(d), int(c), int(w))),
    (re.compile(r"splitnet-wrn-(\d+)-(\d+)"), lambda d, k: splitnet_wrn_spec(int(d), int(k))),
    (re.compile(r"splitnet-resnet(\d+)"), lambda d: splitnet_resnet_spec(int(d))),
    (re.compile(r"splitnet-resnext(\d+)-(\d+)x(\d+)d"),
     lambda d, c, w: splitnet_resnext_spec(int(d), int(c), int(w))),
]

MODELS: dict[str, str] = {
    "small_cnn": "plain conv net for 8x8 digits (1 channel), 24k params",
    "mobilenetv2_tiny": "tiny MobileNetV2 (inverted bottlenecks, depthwise convs) for 8x8 digits, 35k params",
    "resnet20": "CIFAR ResNet-20, basic blocks, widths 16/32/64, 0.27M params",
    "resnet32": "CIFAR ResNet-32, basic blocks, widths 16/32/64, 0.47M params",
    "resnet44": "CIFAR ResNet-44, basic blocks, widths 16/32/64, 0.66M params",
    "resnet56": "CIFAR ResNet-56, basic blocks, widths 16/32/64, 0.86M params",
    "resnet110": "CIFAR ResNet-110, basic blocks, widths 16/32/64, 1.7M params",
    "resnet164": "CIFAR ResNet-164, bottleneck blocks, widths 64/128/256, 1.7M params",
    "wrn-16-4": "Wide ResNet 16-4 (any wrn-D-k: D = 6n+4), 2.7M params",
    "wrn-16-8": "Wide ResNet 16-8, 11.0M params",
    "wrn-28-10": "Wide ResNet 28-10, 36.5M params",
    "wrn-40-10": "Wide ResNet 40-10 (classifier dropout 0.1 as in SplitNet), 55.8M params",
    "resnext29-8x64d": "CIFAR ResNeXt-29 8x64d (any resnextD-CxWd), 34.4M params",
    "resnext29-16x64d": "CIFAR ResNeXt-29 16x64d, 68.2M params",
    "splitnet-wrn-28-10": "WRN-28-10 as the official SplitNet code builds it (post-activation, ResNet-D shortcuts, "
                          "zero-init), 36.5M params",
    "splitnet-resnet110": "ResNet-110 as the official SplitNet code builds it (bottleneck [12,12,12], ResNet-D "
                          "shortcuts), 1.17M params",
    "splitnet-resnext29-8x64d": "ResNeXt-29 8x64d as the official SplitNet code builds it (ResNet-D shortcuts), "
                                "34.5M params",
}


def available_models() -> list[str]:
    """The named zoo models (patterns ``wrn-D-k``, ``resnetD``, ``resnextD-CxWd`` and their ``splitnet-`` forms
    accept other sizes too)."""
    return list(MODELS)


def model_descriptions() -> dict[str, str]:
    """Each named zoo model with a one-line description."""
    return dict(MODELS)


def arch_spec(arch: str) -> ArchSpec:
    """The unsplit :class:`ArchSpec` an arch name stands for."""
    if not isinstance(arch, str):
        raise TypeError(f"arch must be a str, got {type(arch).__name__}")
    name = arch.strip().lower()
    for pattern, make in _PATTERNS:
        m = pattern.fullmatch(name)
        if m:
            return make(*m.groups())
    raise ValueError(f"unknown arch {arch!r}; known: {available_models()} (and the patterns wrn-D-k, resnetD, "
                     "resnextD-CxWd, splitnet-wrn-D-k, splitnet-resnetD, splitnet-resnextD-CxWd)")


def build_from_spec(spec: ArchSpec, *, branches: int, num_classes: int, in_channels: int = 3) -> GroupedClassifier:
    """The grouped model of K branches, each exactly ``spec`` (no division)."""
    cls = FAMILY_CLASSES.get(spec.family)
    if cls is None:
        raise ValueError(f"unknown model family {spec.family!r}; known: {sorted(FAMILY_CLASSES)}")
    return cls(spec, branches=branches, num_classes=num_classes, in_channels=in_channels)


def build_model(arch: str, *, branches: int, num_classes: int, in_channels: int = 3, divide_rule: str = "splitnet",
                divide: bool = True, image_size: int | None = None, **overrides) -> nn.Module:
    """Build the zoo model ``arch`` as K branches in one grouped model.

    Args:
        arch: the UNSPLIT network, e.g. ``"wrn-28-10"``, ``"resnet56"``, ``"resnext29-8x64d"``, ``"small_cnn"``
            (see :func:`available_models`), or ``"pkg.module:Class"``: a plain model of one's own, built K times
            (seeds ``torch.initial_seed() + k``, keywords ``num_classes`` and ``in_channels`` where its ``__init__``
            takes them) and stacked; it is not divided.
        branches: K. K=1 is the ordinary network.
        num_classes: classes per branch; the logits are ``(N, K*num_classes)``.
        in_channels: channels of one view; the model reads ``(N, K*in_channels, H, W)`` (view k to branch k) or a
            shared ``(N, in_channels, H, W)``.
        divide: divide the network into K branches of about 1/K its size (SplitNet); False builds K full copies.
        divide_rule: ``"splitnet"`` (the reference code's per-family rules) or ``"parity"`` (every width / sqrt(K));
            see :mod:`groupnet.models.divide`.
        image_size: for an imported model, the input size the stacking runs its graph on once (default: read from
            the first layer).
        **overrides: :class:`ArchSpec` fields (``depths``, ``widths``, ``stem_width``, ``mid_widths``, ``groups``,
            ``drop_rate``, ``block_drop_rate``, ``zero_init_residual``, ``strides``) set on the per-branch spec
            AFTER division, taken as given: explicit per-branch sizes.
    """
    if is_import_path(arch):
        if overrides:
            raise ValueError(f"ArchSpec overrides {sorted(overrides)} apply to zoo models, not to {arch!r}")
        return build_imported(arch, branches=branches, num_classes=num_classes, in_channels=in_channels,
                              image_size=image_size)
    spec = arch_spec(arch)
    if divide:
        spec = divide_spec(spec, branches, divide_rule)
    if overrides:
        spec = spec.replace(**overrides)
    return build_from_spec(spec, branches=branches, num_classes=num_classes, in_channels=in_channels)

