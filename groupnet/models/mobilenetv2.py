"""A tiny MobileNetV2 family (Sandler et al. 2018) sized for the 8x8 digits: inverted bottlenecks, depthwise convs.

Design (MobileNetV2's, shrunk): stem conv3x3(in->16)-BN-ReLU6; stages of inverted-residual blocks; a block is
[1x1 expand conv-BN-ReLU6, when the expansion ratio t > 1] -> 3x3 depthwise conv (the stage's stride on its first
block)-BN-ReLU6 -> 1x1 linear projection conv-BN, plus the identity shortcut when stride is 1 and the width is kept;
then a 1x1 head conv-BN-ReLU6, global average pool and a linear classifier. The expanded (inner) width is
``round(t * input width)``.

``mobilenetv2_tiny`` (for 8x8 inputs): stages (t, width, blocks, stride) = (1, 8, 1, 1), (6, 16, 2, 1),
(6, 24, 2, 2), (6, 32, 1, 2), head 96: 8x8 -> 4x4 -> 2x2, 35k parameters with 10 classes.

SplitNet division (rule ``"splitnet"`` and ``"parity"`` alike, :mod:`groupnet.models.divide`): every width (stem,
stages, head) divided by sqrt(K), rounded, and the expansion ratios kept. The 1x1 convs, which hold most
parameters, grow with the product of two widths and so shrink by K; the depthwise convs and batch norms grow
linearly and shrink by sqrt(K) only, so the K branches hold more than the unsplit network (1.10x at K=2, 1.25x
at K=4).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from groupnet.models.base import GroupedClassifier, conv1x1, conv3x3
from groupnet.models.spec import ArchSpec
from groupnet.modules import GroupedBatchNorm2d, GroupedConv2d


def mobilenetv2_tiny_spec() -> ArchSpec:
    """The unsplit tiny MobileNetV2 for 8x8 inputs."""
    return ArchSpec(family="mobilenetv2", block="inverted", depths=(1, 2, 2, 1), widths=(8, 16, 24, 32),
                    strides=(1, 1, 2, 2), expand_ratios=(1, 6, 6, 6), stem_width=16, head_width=96)


def inner_width(expand_ratio: float, w_in: int) -> int:
    """The expanded width of an inverted bottleneck: ``round(t * w_in)``."""
    return max(1, int(round(expand_ratio * w_in)))


def depthwise3x3(width: int, branches: int, stride: int = 1) -> GroupedConv2d:
    return GroupedConv2d(width, width, 3, branches=branches, stride=stride, padding=1, groups=width, bias=False)


class InvertedResidual(nn.Module):
    """[1x1 expand-BN-ReLU6] -> 3x3 depthwise-BN-ReLU6 -> 1x1 project-BN (+ identity when shapes allow)."""

    def __init__(self, w_in: int, w_out: int, stride: int, expand_ratio: float, branches: int) -> None:
        super().__init__()
        mid = inner_width(expand_ratio, w_in) if expand_ratio != 1 else w_in
        self.expand_ratio = expand_ratio
        self.expand = None
        if expand_ratio != 1:
            self.expand = conv1x1(w_in, mid, branches)
            self.bn1 = GroupedBatchNorm2d(mid, branches=branches)
        self.dw = depthwise3x3(mid, branches, stride)
        self.bn2 = GroupedBatchNorm2d(mid, branches=branches)
        self.project = conv1x1(mid, w_out, branches)
        self.bn3 = GroupedBatchNorm2d(w_out, branches=branches)
        self.identity = stride == 1 and w_in == w_out

    @property
    def last_bn(self) -> nn.Module | None:
        return self.bn3 if self.identity else None

    def forward(self, x: Tensor) -> Tensor:
        y = x if self.expand is None else F.relu6(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        y = self.bn3(self.project(y))
        return x + y if self.identity else y


class MobileNetV2(GroupedClassifier):
    """K tiny MobileNetV2s (``block="inverted"``) of one :class:`ArchSpec`."""

    def __init__(self, spec: ArchSpec, *, branches: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__(spec, branches=branches, num_classes=num_classes, in_channels=in_channels)
        if spec.block != "inverted":
            raise ValueError(f"MobileNetV2 builds 'inverted' specs, got {spec.block!r}")
        assert spec.expand_ratios is not None and spec.head_width is not None
        self.conv1 = conv3x3(in_channels, spec.stem_width, branches)
        layers: list[nn.Module] = [GroupedBatchNorm2d(spec.stem_width, branches=branches), nn.ReLU6(inplace=True)]
        w_in = spec.stem_width
        for depth, width, stride, t in zip(spec.depths, spec.widths, spec.strides, spec.expand_ratios):
            layers.append(nn.Sequential(*[
                InvertedResidual(w_in if j == 0 else width, width, stride if j == 0 else 1, t, branches)
                for j in range(depth)
            ]))
            w_in = width
        layers += [conv1x1(w_in, spec.head_width, branches), GroupedBatchNorm2d(spec.head_width, branches=branches),
                   nn.ReLU6(inplace=True)]
        self.features = nn.Sequential(*layers)
        self._finish(spec.head_width)
