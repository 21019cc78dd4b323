"""Training: configuration, the loop, checkpoints and torch.distributed set-up."""

from lmmem.checkpoints import load_checkpoint, save_checkpoint
from lmmem.training.config import PRESETS, TrainConfig, build_parser, config_from_args
from lmmem.training.trainer import TrainingDiverged, TrainResult, resume_config, train

__all__ = [
    "PRESETS", "TrainConfig", "TrainResult", "TrainingDiverged", "build_parser", "config_from_args",
    "load_checkpoint", "resume_config", "save_checkpoint", "train",
]
