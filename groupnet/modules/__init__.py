"""Grouped layers: nn.Modules holding all K branches' weights, run as one grouped op."""

from groupnet.modules.conv import GroupedConv2d
from groupnet.modules.linear import GroupedLinear
from groupnet.modules.norm import GroupedBatchNorm1d, GroupedBatchNorm2d, GroupedLayerNorm

__all__ = ["GroupedConv2d", "GroupedLinear", "GroupedBatchNorm1d", "GroupedBatchNorm2d", "GroupedLayerNorm"]
