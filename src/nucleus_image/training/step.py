"""One optimizer step, written once: the training loop, fine-tuning, distillation and the step benchmark all call
`train_step` with their own model, optimizers, micro-batches and loss function.

    out = train_step(model, optimizers, micro_batches, loss_fn, cfg.optimizer, step, dims=dims)
    out.loss, out.grad_norm, out.applied, out.logged     # tensors on the training device

A step: gradients zeroed; for each micro-batch the loss function's loss, backpropagated divided by the number of
micro-batches (so the gradient is the whole batch's mean); the global gradient norm clipped to `grad_clip`; the
learning rate of step `step` under the configured schedule (`schedule.lr_at`: Warmup-Stable-Merge, or a cosine
over `total_steps`); every optimizer stepped. A step whose gradient norm is not finite is skipped: no parameter
and no optimizer state changes.

Nothing here reads a tensor back to the host: the loss stays on the device, the clipping scales the gradients by
a device factor, and the skip is a masked update decided on the device. Each optimizer gets the step's flag as
`found_inf` (1.0: skip), the protocol torch's fused AdamW honours (its update and step count are left as they
were) and `Muon` follows; the gradient norm decides it, the one number every rank already agrees on.

The loss function has the shape `(model, micro_batch) -> (loss, logged)`: a scalar loss tensor and a dict of
tensors to log (averaged over the micro-batches), e.g. `loss.FlowObjective`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .config import OptimizerConfig
from .schedule import lr_at, set_lr

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class StepOutput:
    loss: torch.Tensor  # () float32: this process's loss, the mean over its micro-batches
    grad_norm: torch.Tensor  # () float32: the global gradient norm before clipping
    applied: torch.Tensor  # () bool: whether the update was applied (the gradient norm was finite)
    logged: dict[str, torch.Tensor]  # the loss function's logged values, averaged over the micro-batches


def train_step(
    model: nn.Module,
    optimizers: Sequence[torch.optim.Optimizer],
    micro_batches: Iterable,
    loss_fn: LossFn,
    cfg: OptimizerConfig,
    step: int,
    dims=None,
    params: list[torch.Tensor] | None = None,
    timer=None,
    total_steps: int | None = None,
) -> StepOutput:
    """One optimizer step over `micro_batches` (see the module docstring). `dims`: the `ParallelDims` of a sharded
    model (the gradient norm then sums over the meshes); `params`: what is clipped (default: the model's
    parameters with a gradient); `timer`: a `timing.PhaseTimer` whose laps split the step into forward, backward
    and optimizer, the first counted from the timer's last mark or lap (host wall time: exact on the CPU, launch
    time on a GPU); `total_steps`: the run's length, which a cosine schedule decays over."""
    lap = timer.lap if timer is not None else (lambda _name: None)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    batches = list(micro_batches)
    total, logged = None, {}
    for batch in batches:
        loss, values = loss_fn(model, batch)
        lap("forward")
        (loss / len(batches)).backward()
        lap("backward")
        total = loss.detach().float() if total is None else total + loss.detach().float()
        for key, value in values.items():
            logged[key] = value if key not in logged else logged[key] + value
    mean_loss = total / len(batches)
    logged = {key: value / len(batches) for key, value in logged.items()}

    params = [p for p in (params if params is not None else model.parameters()) if p.grad is not None]
    grad_norm = clip_grad_norm(params, cfg.grad_clip, dims)
    applied = torch.isfinite(grad_norm)
    set_lr(tuple(optimizers), lr_at(cfg, step, total_steps))
    skip = (~applied).float()
    for opt in optimizers:
        opt.found_inf = skip
        try:
            opt.step()
        finally:
            del opt.found_inf
    lap("optimizer")
    return StepOutput(mean_loss, grad_norm, applied, logged)


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, dims=None) -> torch.Tensor:
    """Scale the gradients so their global norm is at most `max_norm`; returns the norm before (a device tensor;
    not finite if any gradient is not)."""
    if dims is not None:
        from ..parallel.collectives import clip_grad_norm_

        return clip_grad_norm_(params, max_norm, dims)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
