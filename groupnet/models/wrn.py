"""Wide ResNets WRN-d-k for CIFAR (Zagoruyko & Komodakis 2016), pre-activation.

Design (the original code): stem conv3x3(in->16); three stages of n = (d-4)/6 blocks at widths 16k/32k/64k and
strides 1/2/2; a block is BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 plus the shortcut, which is the identity or,
where width or stride change, a 1x1 conv (no BN) of the pre-activated input; then BN-ReLU, global average pool and
a linear head. WRN-28-10 has 36.5M parameters. A pre-activation block ends in a conv, not a BN, so there is no
gamma to zero-init: ``zero_init_residual`` does not apply.

On the Triton backend a block runs fused (:mod:`groupnet.models.fused_blocks`): batch norm + ReLU on the convs'
operand loads, the residual add on the last conv's store (not with dropout in training).

SplitNet division: widen factor k -> int(max(k/sqrt(K) + 0.4, 1)), stem kept (see :mod:`groupnet.models.divide`).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from groupnet.models.base import GroupedClassifier, conv1x1, conv3x3
from groupnet.models.fused_blocks import bn_relu_conv, bn_scale_shift, fusable
from groupnet.models.spec import ArchSpec
from groupnet.modules import GroupedBatchNorm2d

WRN_STEM = 16


def wrn_spec(depth: int, widen_factor: int) -> ArchSpec:
    """The unsplit WRN-{depth}-{widen_factor}."""
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"a WRN needs depth = 6n+4, got {depth}")
    if widen_factor < 1:
        raise ValueError(f"a WRN widen factor must be >= 1, got {widen_factor}")
    n, k = (depth - 4) // 6, widen_factor
    # The SplitNet recipes use dropout 0.1 before the classifier for WRN-40-10 and WRN-52-8 (model/resnet.py).
    drop = 0.1 if (depth, k) in ((40, 10), (52, 8)) else 0.0
    return ArchSpec(family="wrn", block="preact", depths=(n, n, n), widths=(16 * k, 32 * k, 64 * k),
                    stem_width=WRN_STEM, strides=(1, 2, 2), drop_rate=drop)


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 + shortcut (identity, or 1x1 conv of the pre-activated input)."""

    def __init__(self, w_in: int, w_out: int, stride: int, branches: int, drop_rate: float) -> None:
        super().__init__()
        self.bn1 = GroupedBatchNorm2d(w_in, branches=branches)
        self.conv1 = conv3x3(w_in, w_out, branches, stride)
        self.bn2 = GroupedBatchNorm2d(w_out, branches=branches)
        self.conv2 = conv3x3(w_out, w_out, branches)
        self.shortcut = conv1x1(w_in, w_out, branches, stride) if (w_in != w_out or stride != 1) else None
        self.drop_rate = drop_rate

    def forward(self, x: Tensor) -> Tensor:
        if fusable(x, self.bn1, self.conv1, self.bn2, self.conv2, self.shortcut) and not (
                self.drop_rate > 0 and self.training):
            return self._fused_forward(x)
        o = F.relu(self.bn1(x))
        y = F.relu(self.bn2(self.conv1(o)), inplace=True)
        if self.drop_rate > 0:
            y = F.dropout(y, self.drop_rate, self.training)
        y = self.conv2(y)
        return y + (x if self.shortcut is None else self.shortcut(o))

    def _fused_forward(self, x: Tensor) -> Tensor:
        """The same block on the Triton backend: each batch norm + ReLU runs on its convs' operand loads (the
        pre-activated tensors are never written) and the residual add on the last conv's store."""
        s1, t1 = bn_scale_shift(self.bn1, x)
        y = bn_relu_conv(x, s1, t1, self.conv1)
        shortcut = x if self.shortcut is None else bn_relu_conv(x, s1, t1, self.shortcut)
        s2, t2 = bn_scale_shift(self.bn2, y)
        return bn_relu_conv(y, s2, t2, self.conv2, residual=shortcut)


class WideResNet(GroupedClassifier):
    """K WRNs (``block="preact"``) of one :class:`ArchSpec`."""

    def __init__(self, spec: ArchSpec, *, branches: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__(spec, branches=branches, num_classes=num_classes, in_channels=in_channels)
        if spec.block != "preact":
            raise ValueError(f"WideResNet builds 'preact' specs, got {spec.block!r}")
        self.conv1 = conv3x3(in_channels, spec.stem_width, branches)
        layers: list[nn.Module] = []
        w_in = spec.stem_width
        for depth, width, stride in zip(spec.depths, spec.widths, spec.strides):
            layers.append(nn.Sequential(*[
                PreActBlock(w_in if j == 0 else width, width, stride if j == 0 else 1, branches, spec.block_drop_rate)
                for j in range(depth)
            ]))
            w_in = width
        layers += [GroupedBatchNorm2d(w_in, branches=branches), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self._finish(w_in)
