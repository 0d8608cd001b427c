"""Warmup-Stable-Merge: the learning rate warms up linearly, then stays constant for the rest of the run.

There is no decay phase: the annealing a decay would give is recovered afterwards by merging the last
checkpoints (`merge.py`), so a run can be extended at any time without a rollback and with no total step
count fixed in advance.
"""

from __future__ import annotations

import torch


def wsm_lr(step: int, peak: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): peak * (step + 1) / warmup during warmup, then peak."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return peak
    return peak * (step + 1) / warmup_steps


def set_lr(optimizers: tuple[torch.optim.Optimizer, ...], lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
