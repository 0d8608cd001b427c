"""Every collective the training code runs, in one module, each on the group and the device it needs.

Device collectives (the loss and routing-statistic means, the clipping norm's sum, a replicated head's gradients) take tensors on the training
device, `dims.device`, and refuse any other: an NCCL group serves GPU tensors only, so a CPU tensor handed to one
stops the run at its first step ("No backend type associated with device type cpu"). Keeping them on the device
also keeps them asynchronous: nothing is read back to the host here.

Host agreement (the stop vote, barriers around the file system) runs on a gloo group over host memory, created
for it on every run (`ParallelDims.host_group`): agreeing on a flag set by a signal handler through the device
would copy it in and read it back, a host-device sync on every step, and a barrier has no device work to wait for.

The training packages call no `torch.distributed` collective themselves (`tests/test_collectives.py` checks).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .mesh import ParallelDims


def _on_device(t: torch.Tensor, dims: ParallelDims, what: str) -> torch.Tensor:
    return _on(t, dims.device, what)


def _on(t: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    if t.device != device:
        raise ValueError(
            f"{what}: a tensor on {t.device}, but this run's collectives run on {device} (an NCCL "
            f"group serves only its GPU's tensors); create the tensor on the training device"
        )
    return t


def mean_over_ranks(value: torch.Tensor, dims: ParallelDims) -> torch.Tensor:
    """The mean of `value` over all ranks (a new tensor, on the training device)."""
    total = _on_device(value, dims, "mean_over_ranks").clone()
    dist.all_reduce(total)
    return total / dims.world


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, dims: ParallelDims) -> torch.Tensor:
    """Global-norm clipping when parameters are sharded over different meshes (experts over efsdp x ep, the rest
    over dp_shard): every local shard's squared norm is summed over the processes of one replica, which together
    hold each parameter exactly once; `torch.nn.utils.clip_grad_norm_` cannot mix meshes. Returns the norm before
    clipping, a () float32 tensor on the device; gradients are scaled by min(1, max_norm / norm) without reading
    it (a non-finite norm leaves them non-finite, and the step skips its update)."""
    grads = [p.grad for p in params if p.grad is not None]
    local = [_on_device(g.to_local(), dims, "clip_grad_norm_") for g in grads if isinstance(g, DTensor)]
    replicated = [_on_device(g, dims, "clip_grad_norm_") for g in grads if not isinstance(g, DTensor)]
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


def all_to_all_split(
    send: torch.Tensor, recv_splits: list[int], send_splits: list[int], group, device: torch.device
) -> torch.Tensor:
    """One all-to-all of a flat buffer cut into exact per-rank sizes (uneven splits, no padding) over `group`;
    returns what the ranks sent here, a new tensor. Muon exchanges its row-split weights this way, on `device`,
    the device its parameters live on (the training device under FSDP2), and refuses a buffer anywhere else."""
    recv = _on(send, device, "all_to_all_split").new_empty(sum(recv_splits))
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
    return recv


@torch.no_grad()
def average_gradients_(params, dims: ParallelDims) -> None:
    """Average the gradients of replicated parameters (plain tensors every rank holds whole, e.g. a training-only
    head outside the sharded model) over all ranks: each rank's gradient is that of its own rows' mean loss, so the
    average is the whole batch's, as one process computes it. One all-reduce of the gradients flattened together."""
    grads = [_on_device(p.grad, dims, "average_gradients_") for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dims.world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def barrier(dims: ParallelDims) -> None:
    """Every rank reaches this point before any goes on (host-side: e.g. a folder written by rank 0)."""
    dist.barrier(group=dims.host_group)


class StopVote:
    """Whether any process asked to stop (Ctrl-C / SIGTERM), agreed at step boundaries without a device sync: each
    boundary posts this process's flag in a non-blocking MAX all-reduce on the host group and reads the vote posted
    at the previous one, which has long finished. Every rank counts the same boundaries, so all of them stop at the
    same one: one step after the first request."""

    def __init__(self, dims: ParallelDims):
        self.dims = dims
        self._pending: tuple[dist.Work, np.ndarray] | None = None

    def poll(self, requested: bool) -> bool:
        agreed = self._read()
        flag = np.array([1.0 if requested else 0.0])  # host memory, shared with the tensor sent
        work = dist.all_reduce(torch.from_numpy(flag), op=dist.ReduceOp.MAX, group=self.dims.host_group, async_op=True)
        self._pending = (work, flag)
        return agreed

    def close(self) -> bool:
        """Wait for the last vote (call on every rank when the loop ends); whether it asked to stop."""
        return self._read()

    def _read(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(flag[0] > 0)
