"""Grouped layers: nn.Modules holding all K branches' weights, run as one grouped op; their registry
(:mod:`groupnet.modules.registry`), the branch-by-branch protocol (:mod:`groupnet.modules.branchwise`) and the
synchronised batch norm (:mod:`groupnet.modules.sync_batchnorm`) and the dynamic-width layers of network augmentation
(:mod:`groupnet.modules.dynamic`)."""

from groupnet.modules.branchwise import BranchSkeletonMixin, BranchwiseLayer
from groupnet.modules.conv import GroupedConv2d
from groupnet.modules.dynamic import DynamicGroupedBatchNorm2d, DynamicGroupedConv2d, DynamicGroupedLinear
from groupnet.modules.linear import GroupedLinear
from groupnet.modules.norm import (
    BranchGrouping,
    GroupedBatchNorm1d,
    GroupedBatchNorm2d,
    GroupedLayerNorm,
    grouped_norm_of,
)
from groupnet.modules.registry import (
    GROUPED_LAYERS,
    GroupedLayerType,
    grouped_class_for,
    grouped_types,
    is_grouped_layer,
    norm_types,
)
from groupnet.modules.sync_batchnorm import (
    SyncBatchNorm1d,
    SyncBatchNorm2d,
    SyncBatchNorm3d,
    SyncGroupedBatchNorm1d,
    SyncGroupedBatchNorm2d,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)

__all__ = [
    "GroupedConv2d", "GroupedLinear", "GroupedBatchNorm1d", "GroupedBatchNorm2d", "GroupedLayerNorm",
    "GROUPED_LAYERS", "GroupedLayerType", "grouped_class_for", "grouped_types", "is_grouped_layer", "norm_types",
    "BranchSkeletonMixin", "BranchwiseLayer",
    "DynamicGroupedConv2d", "DynamicGroupedLinear", "DynamicGroupedBatchNorm2d",
    "SyncBatchNorm1d", "SyncBatchNorm2d", "SyncBatchNorm3d", "SyncGroupedBatchNorm1d", "SyncGroupedBatchNorm2d",
    "convert_sync_batchnorm", "revert_sync_batchnorm", "BranchGrouping", "grouped_norm_of",
]
