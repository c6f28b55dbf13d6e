"""groupnet: train and run an ensemble of K small networks as one fused model.

Layout: K branches' activations are stacked along the channel axis, ``(N, K*C, H, W)`` and ``(N, K*F)``
(see :mod:`groupnet.layout`). Grouped layers hold all K branches' weights and run them as one op.
"""

from groupnet import functional, layout, ops, reference, sparse
from groupnet.layout import branch_slice, repeat, stack, unstack
from groupnet.ops import use_backend
from groupnet.modules import (
    DynamicGroupedBatchNorm2d,
    DynamicGroupedConv2d,
    DynamicGroupedLinear,
    GroupedBatchNorm1d,
    GroupedBatchNorm2d,
    GroupedConv2d,
    GroupedLayerNorm,
    GroupedLinear,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)
from groupnet.reference import PerBranch, reference_of
from groupnet.model_stacking import StackingError, extract_branch, num_branches, stack_models
from groupnet.func_state import load_stacked_state, to_stacked_state
from groupnet.cotraining import CoTrainingLoss, CoTrainingOutput, CoTrainingWeightRamp
from groupnet.ensembling import ensemble, split_branches
from groupnet.complexity import Complexity, complexity
from groupnet.models import available_models, build_model
from groupnet.fuse import fuse_for_inference
from groupnet.netaug import WidthSpace, make_dynamic, recalibrate_batchnorm
from groupnet.branch_major import branch_major_forward
from groupnet.cpu_memory import retain_freed_memory
from groupnet.sparse import DynamicSparseTraining, Masking, itop_stats

__version__ = "0.1.0"

__all__ = [
    "CoTrainingLoss",
    "CoTrainingOutput",
    "CoTrainingWeightRamp",
    "Complexity",
    "DynamicSparseTraining",
    "Masking",
    "DynamicGroupedBatchNorm2d",
    "DynamicGroupedConv2d",
    "DynamicGroupedLinear",
    "WidthSpace",
    "make_dynamic",
    "recalibrate_batchnorm",
    "available_models",
    "branch_major_forward",
    "build_model",
    "complexity",
    "convert_sync_batchnorm",
    "ensemble",
    "fuse_for_inference",
    "itop_stats",
    "split_branches",
    "GroupedBatchNorm1d",
    "GroupedBatchNorm2d",
    "GroupedConv2d",
    "GroupedLayerNorm",
    "GroupedLinear",
    "PerBranch",
    "StackingError",
    "branch_slice",
    "extract_branch",
    "functional",
    "layout",
    "load_stacked_state",
    "num_branches",
    "ops",
    "reference",
    "reference_of",
    "repeat",
    "retain_freed_memory",
    "sparse",
    "revert_sync_batchnorm",
    "stack",
    "stack_models",
    "to_stacked_state",
    "unstack",
    "use_backend",
]
