"""The co-training trainer behind ``python -m groupnet.train``: config, loop, checkpoints, metrics, export, DDP."""

from groupnet.training.config import TrainConfig, build_parser, make_config
from groupnet.training.errors import CheckpointError, ConfigError, TrainingDiverged, UserError
from groupnet.training.export import export_branches
from groupnet.training.trainer import Trainer, run

__all__ = [
    "CheckpointError", "ConfigError", "Trainer", "TrainConfig", "TrainingDiverged", "UserError", "build_parser",
    "export_branches", "make_config", "run",
]
