"""The co-training trainer behind ``python -m groupnet.train``: recipe and run options, loop, checkpoints, metrics,
export, DDP, branch parallelism (:class:`BranchParallel`), and :func:`evaluate_checkpoint` behind
``python -m groupnet.eval``.

The names below are imported on first use, so that the command-line parser (:mod:`groupnet.training.config`, which
imports no torch) builds ``--help`` without loading the training stack.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from groupnet.training.branch_parallel import BranchParallel
    from groupnet.training.config import RunOptions, TrainRecipe, build_parser, make_config
    from groupnet.training.errors import CheckpointError, ConfigError, RunInterrupted, TrainingDiverged, UserError
    from groupnet.training.export import export_branches
    from groupnet.training.run_folder import RunFolder, RunFolderBusy
    from groupnet.training.trainer import Trainer, evaluate_checkpoint, run

_EXPORTS: dict[str, str] = {
    "BranchParallel": "groupnet.training.branch_parallel",
    **dict.fromkeys(("RunOptions", "TrainRecipe", "build_parser", "make_config"), "groupnet.training.config"),
    **dict.fromkeys(("CheckpointError", "ConfigError", "RunInterrupted", "TrainingDiverged", "UserError"),
                    "groupnet.training.errors"),
    "export_branches": "groupnet.training.export",
    **dict.fromkeys(("RunFolder", "RunFolderBusy"), "groupnet.training.run_folder"),
    **dict.fromkeys(("Trainer", "evaluate_checkpoint", "run"), "groupnet.training.trainer"),
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'groupnet.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "BranchParallel", "CheckpointError", "ConfigError", "RunFolder", "RunFolderBusy", "RunInterrupted", "RunOptions",
    "Trainer", "TrainRecipe", "TrainingDiverged", "UserError",
    "build_parser", "evaluate_checkpoint", "export_branches", "make_config", "run",
]
