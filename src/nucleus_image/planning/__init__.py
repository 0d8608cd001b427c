"""Memory planning from shapes on the meta device: per-rank training memory for each parallel layout, and peak
memory of generation for each weight format.

    from nucleus_image.planning import plan_generation, plan_training
"""

from .generation import GenerationPlan, plan_generation, transformer_weight_bytes
from .training import Layout, TrainingPlan, layouts, plan_layout, plan_training

__all__ = [
    "GenerationPlan",
    "Layout",
    "TrainingPlan",
    "layouts",
    "plan_generation",
    "plan_layout",
    "plan_training",
    "transformer_weight_bytes",
]
