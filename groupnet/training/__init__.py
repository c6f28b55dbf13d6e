"""The co-training trainer behind ``python -m groupnet.train``: recipe and run options, loop, checkpoints, metrics,
export, DDP, branch parallelism (:class:`BranchParallel`), and :func:`evaluate_checkpoint` behind
``python -m groupnet.eval``."""

from groupnet.training.branch_parallel import BranchParallel
from groupnet.training.config import RunOptions, TrainRecipe, build_parser, make_config
from groupnet.training.errors import CheckpointError, ConfigError, RunInterrupted, TrainingDiverged, UserError
from groupnet.training.export import export_branches
from groupnet.training.run_folder import RunFolder, RunFolderBusy
from groupnet.training.trainer import Trainer, evaluate_checkpoint, run

__all__ = [
    "BranchParallel", "CheckpointError", "ConfigError", "RunFolder", "RunFolderBusy", "RunInterrupted", "RunOptions",
    "Trainer", "TrainRecipe", "TrainingDiverged", "UserError",
    "build_parser", "evaluate_checkpoint", "export_branches", "make_config", "run",
]
