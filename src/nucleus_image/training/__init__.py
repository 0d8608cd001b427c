"""The training recipe: rectified flow, Muon + AdamW, Warmup-Stable-Merge, curriculum stages, exact resume.

from nucleus_image.training import TrainConfig, Trainer
Trainer(TrainConfig.preset("tiny"), "data/synth", "runs/tiny").train()
"""

from .config import OptimizerConfig, StageConfig, TimestepConfig, TrainConfig
from .merge import decay_weights, merge_coefficients, merge_run, merge_state_dicts
from .muon import Muon
from .state import NonFiniteLossError, TrainState
from .step import StepOutput, train_step
from .trainer import Trainer, TrainResult

__all__ = [
    "Muon",
    "NonFiniteLossError",
    "OptimizerConfig",
    "StageConfig",
    "StepOutput",
    "TimestepConfig",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "decay_weights",
    "merge_coefficients",
    "merge_run",
    "merge_state_dicts",
    "train_step",
]
