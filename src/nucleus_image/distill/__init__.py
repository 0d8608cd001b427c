"""Few-step, guidance-free students of a pipeline, trained as LoRA adapters (`nucleus distill`): the teacher's
trajectories (trajectories.py), the objective (objective.py), DMD2's distribution-matching term beside it
(distribution_matching.py) and the run (distiller.py)."""

from .distiller import DistillConfig, Distiller
from .distribution_matching import MatchingConfig
from .objective import trajectory_loss
from .trajectories import TrajectoryPlan, TrajectoryStore, generate_trajectories

__all__ = [
    "DistillConfig",
    "Distiller",
    "MatchingConfig",
    "TrajectoryPlan",
    "TrajectoryStore",
    "generate_trajectories",
    "trajectory_loss",
]
