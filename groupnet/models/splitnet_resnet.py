"""The CIFAR networks exactly as the official SplitNet code defines them (Zhao et al., "Divide and Co-training",
``model/resnet.py``): named ``splitnet-wrn-D-k``, ``splitnet-resnetD`` and ``splitnet-resnextD-CxWd`` so they are
not confused with the zoo's ``wrn-D-k`` (pre-activation), ``resnetD`` (basic blocks below 164) and ``resnextD-CxWd``.

The official code builds all three from one torchvision-style ResNet class; so does :class:`SplitNetResNet`:

- stem conv3x3(in->b)-BN-ReLU; three stages at strides 1/2/2; global average pool, (dropout), linear head.
- post-activation blocks: basic conv3x3(strided)-BN-ReLU-conv3x3-BN, or bottleneck 1x1-BN-ReLU, 3x3 (strided,
  grouped)-BN-ReLU, 1x1-BN; plus the shortcut, then ReLU.
- shortcuts (ResNet-D, He et al. "Bag of Tricks"): the identity; a 1x1 conv + BN where only the width changes; where
  the stride is 2, a 2x2 average pool (stride 2, ceil mode, padding not counted) THEN a 1x1 conv + BN.
- init: convs kaiming-normal (fan_out), BN gamma 1 / beta 0, the last BN gamma of every residual branch 0
  (zero-init), the classifier N(0, 1e-3) with zero bias.

Sizes:

- ``splitnet-wrn-D-k`` (official ``wide_resnet{D}_{k}``): basic blocks, n = (D-4)/6 per stage, stem 16, widths
  16k/32k/64k; dropout 0.1 before the classifier only for WRN-40-10 (the only WRN the official CIFAR code gives
  one: WRN-52-8's dropout is set but not built on CIFAR). WRN-28-10: 36.54M params (100 classes).
- ``splitnet-resnetD`` (official ``resnet110``/``resnet164``): bottleneck blocks, n = (D-2)/9 per stage
  (ResNet-110 is [12, 12, 12]), stem 16, inner widths 16/32/64, outputs 64/128/256. ResNet-110: 1.17M params.
- ``splitnet-resnextD-CxWd`` (official ``resnext29_8x64d``): bottleneck blocks, n = (D-2)/9, stem 64, inner widths
  C*W, 2*C*W, 4*C*W in C groups, outputs 256/512/1024. ResNeXt-29 8x64d: 34.5M params.

SplitNet division (:mod:`groupnet.models.divide`, the same rules as the zoo's families): WRN widen factor
k -> int(max(k/sqrt(K) + 0.4, 1)); ResNet base width 16 -> {2: 12, 4: 8}; ResNeXt cardinality C -> C/K; the
classifier dropout divided by K.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from groupnet.models.base import GroupedClassifier, conv1x1, conv3x3
from groupnet.models.spec import ArchSpec
from groupnet.modules import GroupedBatchNorm2d, GroupedLinear

SPLITNET_FAMILIES = ("splitnet_wrn", "splitnet_resnet", "splitnet_resnext")
HEAD_INIT_STD = 1e-3


def splitnet_wrn_spec(depth: int, widen_factor: int) -> ArchSpec:
    """The unsplit official WRN-{depth}-{widen_factor} (post-activation basic blocks, ResNet-D shortcuts)."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"a WRN needs depth = 6n+4, got {depth}")
    if widen_factor < 1:
        raise ValueError(f"a WRN widen factor must be >= 1, got {widen_factor}")
    n, k = (depth - 4) // 6, widen_factor
    drop = 0.1 if (depth, k) == (40, 10) else 0.0
    return ArchSpec(family="splitnet_wrn", block="basic", depths=(n, n, n), widths=(16 * k, 32 * k, 64 * k),
                    stem_width=16, strides=(1, 2, 2), drop_rate=drop)


def splitnet_resnet_spec(depth: int) -> ArchSpec:
    """The unsplit official CIFAR ResNet-{depth}: bottleneck blocks, depth = 9n+2 (ResNet-110 is [12, 12, 12])."""
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(f"the SplitNet CIFAR ResNet uses bottleneck blocks and needs depth = 9n+2, got {depth}")
    n = (depth - 2) // 9
    return ArchSpec(family="splitnet_resnet", block="bottleneck", depths=(n, n, n), widths=(64, 128, 256),
                    mid_widths=(16, 32, 64), stem_width=16, strides=(1, 2, 2))


def splitnet_resnext_spec(depth: int, cardinality: int, group_width: int) -> ArchSpec:
    """The unsplit official CIFAR ResNeXt-{depth} {cardinality}x{group_width}d (ResNet-D shortcuts)."""
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(f"a CIFAR ResNeXt needs depth = 9n+2, got {depth}")
    if cardinality < 1 or group_width < 1:
        raise ValueError(f"a ResNeXt needs cardinality and group width >= 1, got {cardinality}x{group_width}d")
    n = (depth - 2) // 9
    mid = cardinality * group_width
    return ArchSpec(family="splitnet_resnext", block="bottleneck", depths=(n, n, n), widths=(256, 512, 1024),
                    mid_widths=(mid, 2 * mid, 4 * mid), groups=cardinality, stem_width=64, strides=(1, 2, 2))


class Shortcut(nn.Module):
    """The ResNet-D projection: [2x2 average pool, stride 2, ceil mode, where ``stride`` is 2] -> 1x1 conv -> BN."""

    def __init__(self, w_in: int, w_out: int, stride: int, branches: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = conv1x1(w_in, w_out, branches)
        self.bn = GroupedBatchNorm2d(w_out, branches=branches)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = F.avg_pool2d(x, 2, self.stride, ceil_mode=True, count_include_pad=False)
        return self.bn(self.conv(x))


class BasicBlock(nn.Module):
    """conv3x3 (strided)-BN-ReLU-conv3x3-BN + shortcut, ReLU (the official WRN block)."""

    def __init__(self, w_in: int, w_out: int, stride: int, branches: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(w_in, w_out, branches, stride)
        self.bn1 = GroupedBatchNorm2d(w_out, branches=branches)
        self.conv2 = conv3x3(w_out, w_out, branches)
        self.bn2 = GroupedBatchNorm2d(w_out, branches=branches)
        self.downsample = Shortcut(w_in, w_out, stride, branches) if (w_in != w_out or stride != 1) else None

    @property
    def last_bn(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)), inplace=True)


class BottleneckBlock(nn.Module):
    """1x1-BN-ReLU, 3x3 (strided, ``groups``)-BN-ReLU, 1x1-BN + shortcut, ReLU (the official ResNet-110/ResNeXt)."""

    def __init__(self, w_in: int, w_out: int, stride: int, branches: int, w_mid: int, groups: int) -> None:
        super().__init__()
        self.conv1 = conv1x1(w_in, w_mid, branches)
        self.bn1 = GroupedBatchNorm2d(w_mid, branches=branches)
        self.conv2 = conv3x3(w_mid, w_mid, branches, stride, groups)
        self.bn2 = GroupedBatchNorm2d(w_mid, branches=branches)
        self.conv3 = conv1x1(w_mid, w_out, branches)
        self.bn3 = GroupedBatchNorm2d(w_out, branches=branches)
        self.downsample = Shortcut(w_in, w_out, stride, branches) if (w_in != w_out or stride != 1) else None

    @property
    def last_bn(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)), inplace=True)


class SplitNetResNet(GroupedClassifier):
    """K copies of the official SplitNet CIFAR ResNet / WRN / ResNeXt of one :class:`ArchSpec` (``basic`` or
    ``bottleneck`` blocks, ResNet-D shortcuts, zero-init, classifier N(0, 1e-3))."""

    def __init__(self, spec: ArchSpec, *, branches: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__(spec, branches=branches, num_classes=num_classes, in_channels=in_channels)
        if spec.block not in ("basic", "bottleneck"):
            raise ValueError(f"SplitNetResNet builds 'basic' or 'bottleneck' specs, got {spec.block!r}")
        self.conv1 = conv3x3(in_channels, spec.stem_width, branches)
        layers: list[nn.Module] = [GroupedBatchNorm2d(spec.stem_width, branches=branches), nn.ReLU(inplace=True)]
        w_in = spec.stem_width
        for i, (depth, width, stride) in enumerate(zip(spec.depths, spec.widths, spec.strides)):
            stage = []
            for j in range(depth):
                s = stride if j == 0 else 1
                if spec.block == "basic":
                    stage.append(BasicBlock(w_in, width, s, branches))
                else:
                    stage.append(BottleneckBlock(w_in, width, s, branches, spec.mid_widths[i], spec.groups))
                w_in = width
            layers.append(nn.Sequential(*stage))
        self.features = nn.Sequential(*layers)
        self._finish(w_in)
        if not any(p.is_meta for p in self.parameters()):
            head: GroupedLinear = self.head
            nn.init.normal_(head.weight.data, std=HEAD_INIT_STD)  # the official code's classifier init
            if head.bias is not None:
                nn.init.zeros_(head.bias.data)

