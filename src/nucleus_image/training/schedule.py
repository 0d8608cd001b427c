"""Learning-rate schedules. The recipe's is Warmup-Stable-Merge: the learning rate warms up linearly, then stays
constant for the rest of the run.

There is no decay phase: the annealing a decay would give is recovered afterwards by merging the last
checkpoints (`merge.py`), so a run can be extended at any time without a rollback and with no total step
count fixed in advance.

The baseline it replaces, "cosine", has the same warmup and then decays along a half cosine from the peak to
`min_lr_ratio * peak` at the run's last step, so it needs the total step count. `lr_at` reads it at every step:
when the trainer's time guard re-plans the run's length, the rest of the decay follows the new total (the
learning rate moves at that step to where the new plan puts it) and the last step still ends at the floor.
"""

from __future__ import annotations

import math

import torch

from .config import OptimizerConfig


def wsm_lr(step: int, peak: float, warmup_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based): peak * (step + 1) / warmup during warmup, then peak."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return peak
    return peak * (step + 1) / warmup_steps


def cosine_lr(step: int, peak: float, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning rate of step `step` (0-based) of a `total_steps` run: wsm_lr's warmup, then
    peak * (r + (1 - r) * (1 + cos(pi * t)) / 2) with t = (step - warmup) / (total - 1 - warmup), which is peak at
    the first step after warmup and r * peak at the last step (total - 1); steps past the end stay at r * peak."""
    if step < warmup_steps:
        return wsm_lr(step, peak, warmup_steps)
    span = total_steps - 1 - max(warmup_steps, 0)
    t = 1.0 if span <= 0 else min((step - max(warmup_steps, 0)) / span, 1.0)
    return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t)))


def lr_at(cfg: OptimizerConfig, step: int, total_steps: int | None = None) -> float:
    """Learning rate of step `step` under `cfg.schedule`; "cosine" needs the run's `total_steps`."""
    if cfg.schedule == "wsm":
        return wsm_lr(step, cfg.lr, cfg.warmup_steps)
    if total_steps is None:
        raise ValueError(f"optimizer.schedule={cfg.schedule!r} needs the run's total step count; this loop gave none")
    return cosine_lr(step, cfg.lr, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)


def set_lr(optimizers: tuple[torch.optim.Optimizer, ...], lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
