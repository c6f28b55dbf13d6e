"""CIFAR ResNeXt-29 CxDd (Xie et al. 2017): C groups of width D in the 3x3 conv of every bottleneck.

Design: stem conv3x3(in->64)-BN-ReLU; three stages of 3 bottleneck blocks (depth = 9n+2 with n=3) at output widths
256/512/1024, inner widths C*D, 2*C*D, 4*C*D (cardinality C, the width per group doubling with the stage), strides
1/2/2; projection shortcuts 1x1 conv + BN. The blocks are :class:`groupnet.models.resnet.BottleneckBlock`.
ResNeXt-29 8x64d has 34.4M parameters.

SplitNet division: the cardinality is divided (8x64d -> 4x64d at K=2), the rest kept, so the total grows a
little with K (see :mod:`groupnet.models.divide`).
"""

from __future__ import annotations

from groupnet.models.spec import ArchSpec

RESNEXT_STEM = 64
RESNEXT_WIDTHS = (256, 512, 1024)


def resnext_spec(depth: int, cardinality: int, group_width: int) -> ArchSpec:
    """The unsplit CIFAR ResNeXt-{depth} {cardinality}x{group_width}d."""
    if depth < 11 or (depth - 2) % 9:
        raise ValueError(f"a CIFAR ResNeXt needs depth = 9n+2, got {depth}")
    n = (depth - 2) // 9
    mid = cardinality * group_width
    return ArchSpec(family="resnext", block="bottleneck", depths=(n, n, n), widths=RESNEXT_WIDTHS,
                    mid_widths=(mid, 2 * mid, 4 * mid), groups=cardinality, stem_width=RESNEXT_STEM,
                    strides=(1, 2, 2))
