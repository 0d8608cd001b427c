"""Reductions across ranks the training loop needs: a gradient norm over parameters on different meshes,
and the mean of logged values (loss, routing statistics) over the data-parallel ranks."""

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
