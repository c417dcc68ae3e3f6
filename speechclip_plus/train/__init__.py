"""Training engine: trainer, distributed set-up, checkpoints, LR schedule, run records."""
from __future__ import annotations

from .checkpoint import CheckpointDir, load_checkpoint, load_model_state
from .distributed import DistInfo, init_distributed
from .scheduler import build_scheduler, warmup_decay_factor
from .trainer import Trainer, TrainingDiverged

__all__ = [
    "CheckpointDir", "DistInfo", "Trainer", "TrainingDiverged", "build_scheduler", "init_distributed",
    "load_checkpoint", "load_model_state", "warmup_decay_factor",
]
