"""CIFAR ResNets (He et al. 2016), post-activation, as in pycls: ResNet-20/32/44/56/110 basic, ResNet-164 bottleneck.

Design (pycls's CIFAR ResNet, which its complexity anchors pin down: R-56 has 855,770 params): stem conv3x3(in->16)
-BN-ReLU; three stages of n blocks at widths 16/32/64 and strides 1/2/2 (depth = 6n+2); a block is
conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU; the shortcut is the identity, or a 1x1 conv + BN
(projection) where width or stride change; global average pool and a linear head. ResNet-164 uses bottleneck blocks
1x1(w/4)-3x3(w/4, strided)-1x1(w) at output widths 64/128/256 (depth = 9n+2). The same bottleneck block with a
grouped 3x3 is ResNeXt (:mod:`groupnet.models.resnext`).

At inference on the Triton backend a block runs fused (:mod:`groupnet.models.fused_blocks`): each batch norm folded
into its conv, the ReLUs and the residual add in the convs' epilogues; training runs the modules.

SplitNet division: base width 16 -> {2: 12, 4: 8, 8: 6} (see :mod:`groupnet.models.divide`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from groupnet.models.base import GroupedClassifier, conv1x1, conv3x3
from groupnet.models.fused_blocks import foldable, folded_conv, fusable
from groupnet.models.spec import ArchSpec
from groupnet.modules import GroupedBatchNorm2d


def resnet_spec(depth: int, *, base_width: int = 16, block: str | None = None) -> ArchSpec:
    """The unsplit CIFAR ResNet of a given depth: basic blocks (depth = 6n+2) below 164, bottleneck (9n+2) from 164
    on (He et al.'s ResNet-164/1001), unless ``block`` says otherwise."""
    block = block or ("basic" if depth < 164 else "bottleneck")
    per_block = {"basic": 2, "bottleneck": 3}.get(block)
    if per_block is None:
        raise ValueError(f"a ResNet block must be 'basic' or 'bottleneck', got {block!r}")
    if depth < 2 + 3 * per_block or (depth - 2) % (3 * per_block):
        raise ValueError(f"a CIFAR ResNet with {block} blocks needs depth = {3 * per_block}n+2, got {depth}")
    n = (depth - 2) // (3 * per_block)
    b = base_width
    if block == "basic":
        return ArchSpec(family="resnet", block="basic", depths=(n, n, n), widths=(b, 2 * b, 4 * b), stem_width=b,
                        strides=(1, 2, 2))
    return ArchSpec(family="resnet", block="bottleneck", depths=(n, n, n), widths=(4 * b, 8 * b, 16 * b),
                    mid_widths=(b, 2 * b, 4 * b), stem_width=b, strides=(1, 2, 2))


class Projection(nn.Module):
    """The shortcut where width or stride change: 1x1 conv + BN."""

    def __init__(self, w_in: int, w_out: int, stride: int, branches: int) -> None:
        super().__init__()
        self.conv = conv1x1(w_in, w_out, branches, stride)
        self.bn = GroupedBatchNorm2d(w_out, branches=branches)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x))


def _fuses(block: nn.Module, x: Tensor, *modules: nn.Module) -> bool:
    """Whether ``block`` runs fused: at inference (every batch norm in eval mode, with running statistics) on the
    Triton backend, each batch norm folded into its conv and the ReLU and residual add in the conv's epilogue."""
    proj = (block.proj.conv, block.proj.bn) if block.proj is not None else ()
    if block.proj is not None and (block.proj._forward_hooks or block.proj._forward_pre_hooks):
        return False
    return foldable(*modules[1::2], *proj[1:]) and fusable(x, *modules, *proj)


def _shortcut(block: nn.Module, x: Tensor) -> Tensor:
    return x if block.proj is None else folded_conv(x, block.proj.conv, block.proj.bn, relu=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU."""

    def __init__(self, w_in: int, w_out: int, stride: int, branches: int) -> None:
        super().__init__()
        self.conv1 = conv3x3(w_in, w_out, branches, stride)
        self.bn1 = GroupedBatchNorm2d(w_out, branches=branches)
        self.conv2 = conv3x3(w_out, w_out, branches)
        self.bn2 = GroupedBatchNorm2d(w_out, branches=branches)
        self.proj = Projection(w_in, w_out, stride, branches) if (w_in != w_out or stride != 1) else None

    @property
    def last_bn(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        if _fuses(self, x, self.conv1, self.bn1, self.conv2, self.bn2):
            y = folded_conv(x, self.conv1, self.bn1, relu=True)
            return folded_conv(y, self.conv2, self.bn2, relu=True, residual=_shortcut(self, x))
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.proj is None else self.proj(x)), inplace=True)


class BottleneckBlock(nn.Module):
    """1x1-BN-ReLU, 3x3 (strided, ``groups``)-BN-ReLU, 1x1-BN + shortcut, ReLU."""

    def __init__(self, w_in: int, w_out: int, stride: int, branches: int, w_mid: int, groups: int = 1) -> None:
        super().__init__()
        self.conv1 = conv1x1(w_in, w_mid, branches)
        self.bn1 = GroupedBatchNorm2d(w_mid, branches=branches)
        self.conv2 = conv3x3(w_mid, w_mid, branches, stride, groups)
        self.bn2 = GroupedBatchNorm2d(w_mid, branches=branches)
        self.conv3 = conv1x1(w_mid, w_out, branches)
        self.bn3 = GroupedBatchNorm2d(w_out, branches=branches)
        self.proj = Projection(w_in, w_out, stride, branches) if (w_in != w_out or stride != 1) else None

    @property
    def last_bn(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        if _fuses(self, x, self.conv1, self.bn1, self.conv2, self.bn2, self.conv3, self.bn3):
            y = folded_conv(x, self.conv1, self.bn1, relu=True)
            y = folded_conv(y, self.conv2, self.bn2, relu=True)
            return folded_conv(y, self.conv3, self.bn3, relu=True, residual=_shortcut(self, x))
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.proj is None else self.proj(x)), inplace=True)


class CifarResNet(GroupedClassifier):
    """K CIFAR ResNets / ResNeXts (``block="basic"`` or ``"bottleneck"``) of one :class:`ArchSpec`."""

    def __init__(self, spec: ArchSpec, *, branches: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__(spec, branches=branches, num_classes=num_classes, in_channels=in_channels)
        if spec.block not in ("basic", "bottleneck"):
            raise ValueError(f"CifarResNet builds 'basic' or 'bottleneck' specs, got {spec.block!r}")
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
