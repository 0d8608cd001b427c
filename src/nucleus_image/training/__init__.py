"""The training recipe: rectified flow, Muon + AdamW, Warmup-Stable-Merge, curriculum stages, exact resume.

    from nucleus_image.training import TrainConfig, Trainer
    Trainer(TrainConfig.preset("tiny"), "data/synth", "runs/tiny").train()
"""

from .config import StageConfig, TimestepConfig, TrainConfig
from .merge import decay_weights, merge_coefficients, merge_run, merge_state_dicts
from .muon import Muon
from .trainer import NonFiniteLossError, Trainer, TrainResult

__all__ = ["Muon", "NonFiniteLossError", "StageConfig", "TimestepConfig", "TrainConfig", "TrainResult", "Trainer",
           "decay_weights", "merge_coefficients", "merge_run", "merge_state_dicts"]
