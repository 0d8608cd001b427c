"""Reductions across ranks the training loop needs: a gradient norm over parameters on different meshes,
the mean of logged values (loss, routing statistics) over the data-parallel ranks, and the average gradient of
replicated parameters outside the sharded model."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .mesh import ParallelDims


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, dims: ParallelDims) -> torch.Tensor:
    """Global-norm clipping when parameters are sharded over different meshes (experts over efsdp x ep, the
    rest over dp_shard): every local shard's squared norm is summed over the processes of one replica, which
    together hold each parameter exactly once; `torch.nn.utils.clip_grad_norm_` cannot mix meshes."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [g.to_local() for g in grads if isinstance(g, DTensor)]
    replicated = [g for g in grads if not isinstance(g, DTensor)]
    sq = torch.zeros((), dtype=torch.float32, device=dims.device)
    for g in local:
        sq += g.float().pow(2).sum()
    dist.all_reduce(sq, group=dims.shard_group)
    for g in replicated:
        sq += g.float().pow(2).sum()
    total = sq.sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in local + replicated:
        g.mul_(coef.to(g.dtype))
    return total


def mean_over_ranks(value: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """The mean of `value` over all ranks."""
    total = value.clone()
    dist.all_reduce(total)
    return total / dims.world


@torch.no_grad()
def average_gradients_(params, dims: ParallelDims) -> None:
    """Average the gradients of replicated parameters (plain tensors every rank holds whole, e.g. a training-only
    head outside the sharded model) over all ranks: each rank's gradient is that of its own rows' mean loss, so the
    average is the whole batch's, as one process computes it. One all-reduce of the gradients flattened together."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dims.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
