"""Training: configuration, the loop (with step hooks), run folders and torch.distributed set-up.

Checkpoints are read and written by :mod:`lmmem.checkpoints` (re-exported here for convenience)."""

from lmmem.checkpoints import load_checkpoint, save_checkpoint
from lmmem.errors import TrainingDiverged
from lmmem.training.config import PRESETS, TrainConfig, build_parser, config_from_args
from lmmem.training.run import Run
from lmmem.training.run_folder import resume_config
from lmmem.training.trainer import StepHook, TrainResult, train

__all__ = [
    "PRESETS", "Run", "StepHook", "TrainConfig", "TrainResult", "TrainingDiverged", "build_parser", "config_from_args",
    "load_checkpoint", "resume_config", "save_checkpoint", "train",
]
