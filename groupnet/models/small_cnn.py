"""small_cnn: a plain conv net sized for scikit-learn's 8x8 digits (the embedded default data set).

Unsplit: conv3x3(in->16) | stage 1: conv3x3(16->32) at 8x8 | max-pool 2 | stage 2: conv3x3(32->64) at 4x4 | global
average pool | linear(64->classes); every conv is followed by BN and ReLU. 24k parameters and 0.6M multiply-adds per
8x8 image. SplitNet has no rule for it; it is divided like the others, every width by sqrt(K) (K=2: 11/23/45).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from groupnet.models.base import GroupedClassifier, conv3x3
from groupnet.models.spec import ArchSpec
from groupnet.modules import GroupedBatchNorm2d


def small_cnn_spec() -> ArchSpec:
    """The unsplit small_cnn."""
    return ArchSpec(family="small_cnn", block="plain", depths=(1, 1), widths=(32, 64), stem_width=16, strides=(1, 2))


class ConvBNReLU(nn.Module):
    """conv3x3 -> BN -> ReLU on K branches."""

    def __init__(self, w_in: int, w_out: int, branches: int) -> None:
        super().__init__()
        self.conv = conv3x3(w_in, w_out, branches)
        self.bn = GroupedBatchNorm2d(w_out, branches=branches)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


class SmallCNN(GroupedClassifier):
    """K plain conv nets (``block="plain"``): stages of conv-BN-ReLU, stage strides done by max-pool."""

    def __init__(self, spec: ArchSpec, *, branches: int, num_classes: int, in_channels: int = 1) -> None:
        super().__init__(spec, branches=branches, num_classes=num_classes, in_channels=in_channels)
        if spec.block != "plain":
            raise ValueError(f"SmallCNN builds block='plain' specs, got {spec.block!r}")
        self.conv1 = conv3x3(in_channels, spec.stem_width, branches)
        layers: list[nn.Module] = [GroupedBatchNorm2d(spec.stem_width, branches=branches), nn.ReLU(inplace=True)]
        w_in = spec.stem_width
        for depth, width, stride in zip(spec.depths, spec.widths, spec.strides):
            if stride > 1:
                layers.append(nn.MaxPool2d(stride))
            for _ in range(depth):
                layers.append(ConvBNReLU(w_in, width, branches))
                w_in = width
        self.features = nn.Sequential(*layers)
        self._finish(w_in)
