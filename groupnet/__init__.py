"""groupnet: train and run an ensemble of K small networks as one fused model.

Layout: K branches' activations are stacked along the channel axis, ``(N, K*C, H, W)`` and ``(N, K*F)``
(see :mod:`groupnet.layout`). Grouped layers hold all K branches' weights and run them as one op.
"""

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers and IDEs; at run time they are imported on first use
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

#: Public name -> the module that defines it (or the submodule itself, for the names in _SUBMODULES). The facade imports
#: nothing up front, so that ``import groupnet.<module>`` (and the CLIs' ``--help``) cost only what they use.
_EXPORTS: dict[str, str] = {
    "functional": "groupnet.functional",
    "layout": "groupnet.layout",
    "ops": "groupnet.ops",
    "reference": "groupnet.reference",
    "sparse": "groupnet.sparse",
    "branch_slice": "groupnet.layout",
    "repeat": "groupnet.layout",
    "stack": "groupnet.layout",
    "unstack": "groupnet.layout",
    "use_backend": "groupnet.ops",
    "DynamicGroupedBatchNorm2d": "groupnet.modules",
    "DynamicGroupedConv2d": "groupnet.modules",
    "DynamicGroupedLinear": "groupnet.modules",
    "GroupedBatchNorm1d": "groupnet.modules",
    "GroupedBatchNorm2d": "groupnet.modules",
    "GroupedConv2d": "groupnet.modules",
    "GroupedLayerNorm": "groupnet.modules",
    "GroupedLinear": "groupnet.modules",
    "convert_sync_batchnorm": "groupnet.modules",
    "revert_sync_batchnorm": "groupnet.modules",
    "PerBranch": "groupnet.reference",
    "reference_of": "groupnet.reference",
    "StackingError": "groupnet.model_stacking",
    "extract_branch": "groupnet.model_stacking",
    "num_branches": "groupnet.model_stacking",
    "stack_models": "groupnet.model_stacking",
    "load_stacked_state": "groupnet.func_state",
    "to_stacked_state": "groupnet.func_state",
    "CoTrainingLoss": "groupnet.cotraining",
    "CoTrainingOutput": "groupnet.cotraining",
    "CoTrainingWeightRamp": "groupnet.cotraining",
    "ensemble": "groupnet.ensembling",
    "split_branches": "groupnet.ensembling",
    "Complexity": "groupnet.complexity",
    "complexity": "groupnet.complexity",
    "available_models": "groupnet.models",
    "build_model": "groupnet.models",
    "fuse_for_inference": "groupnet.fuse",
    "WidthSpace": "groupnet.netaug",
    "make_dynamic": "groupnet.netaug",
    "recalibrate_batchnorm": "groupnet.netaug",
    "branch_major_forward": "groupnet.branch_major",
    "retain_freed_memory": "groupnet.cpu_memory",
    "DynamicSparseTraining": "groupnet.sparse",
    "Masking": "groupnet.sparse",
    "itop_stats": "groupnet.sparse",
}


_SUBMODULES = frozenset({"functional", "layout", "ops", "reference", "sparse"})


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'groupnet' has no attribute {name!r}")
    value = importlib.import_module(module)
    if name not in _SUBMODULES:
        value = getattr(value, name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Facade(types.ModuleType):
    """Keeps ``groupnet.complexity`` the function: importing the submodule of the same name would otherwise bind the
    module to that attribute (the import system sets every loaded submodule on its package)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "complexity" and isinstance(value, types.ModuleType):
            value = value.complexity
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Facade


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
