"""Muon: momentum SGD whose update is orthogonalised by a Newton-Schulz iteration, for matrix weights.

For a weight W (rows x cols) with gradient G: B <- mu*B + (1-mu)*G (momentum), U = G + mu*(B - G) (Nesterov,
i.e. G.lerp(B, mu)), O = NS5(U) ~ the nearest semi-orthogonal matrix U V^T of U = U S V^T, and

    W <- W * (1 - lr*wd) - lr * 0.2 * sqrt(max(rows, cols)) * O

The factor 0.2*sqrt(max(rows, cols)) makes the update's RMS that of a typical AdamW update (~0.2), so Muon and
AdamW groups can share one learning rate and schedule (Moonlight; `torch.optim.Muon(adjust_lr_fn=
"match_rms_adamw")`). This matches torch's Muon on 2-D weights, and extends it to stacked expert weights:
a (E, rows, cols) tensor is E independent matrices, each orthogonalised on its own (one batched NS iteration),
with rows/cols of one expert in the scale. Orthogonalising the stack as one (E*rows, cols) matrix would couple
experts that never see each other's tokens.

Under FSDP2 / expert parallelism parameters are DTensors: see `_whole_matrices` for what is gathered.
"""

from __future__ import annotations

import math

import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic, slope-maximising at 0 (Keller Jordan's Muon)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximate U V^T for each trailing (rows, cols) matrix of g (any leading batch dims), in `dtype`.

    Singular values land in roughly [0.7, 1.2] rather than exactly 1: the coefficients trade exactness for
    speed, which does not hurt training (see torch.optim.Muon's notes)."""
    if g.dim() < 2:
        raise ValueError(f"Muon orthogonalises matrices; got a tensor of shape {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    transpose = g.size(-2) > g.size(-1)
    if transpose:
        x = x.mT
    # Frobenius norm per matrix bounds the spectral norm, so every singular value starts in (0, 1].
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if transpose else x


def update_scale(shape: torch.Size) -> float:
    """0.2 * sqrt(max(rows, cols)) of one matrix (the trailing two dims)."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights and stacked (E, rows, cols) expert weights. `ns_dtype` bfloat16 matches the
    reference implementation on GPU; float32 is faster on CPUs without bf16 matmul units."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, eps: float = 1e-7, ns_dtype: torch.dtype = torch.bfloat16):
        if lr <= 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(f"Muon needs lr > 0, 0 <= momentum < 1, weight_decay >= 0; got lr={lr}, momentum={momentum}, weight_decay={weight_decay}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, eps=eps)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() not in (2, 3):
                    raise ValueError(f"Muon takes 2-D matrices or 3-D expert stacks; got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # `found_inf` (1.0: skip this step), set by `step.train_step` as torch's fused AdamW reads it: a skipped step
        # leaves every weight and momentum buffer as it was, decided on the device without reading the flag.
        found_inf = getattr(self, "found_inf", None)
        keep = None if found_inf is None else 1.0 - found_inf
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            # Matrices of one shape are orthogonalised in one batched iteration: the result is the same per
            # matrix, at one set of kernel launches per shape instead of per parameter.
            by_shape: dict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad if keep is None else p.grad.nan_to_num_(0.0, 0.0, 0.0)  # a skipped step's NaNs
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(grad)
                buf = state["momentum_buffer"]
                buf.lerp_(grad, 1 - mu if keep is None else keep * (1 - mu))
                update = grad.lerp(buf, mu) if group["nesterov"] else buf
                update = _whole_matrices(update)
                by_shape.setdefault((tuple(update.shape), p.dtype, p.device), []).append((p, update))
            for members in by_shape.values():
                ortho = orthogonalize(torch.stack([u for _, u in members]), group["ns_steps"], group["eps"], self.ns_dtype)
                for (p, _), o in zip(members, ortho):
                    target = p.to_local() if isinstance(p, DTensor) else p
                    if wd:
                        target.mul_(1 - lr * wd if keep is None else 1 - keep * (lr * wd))
                    update = _local_slice(o, p).to(p.dtype)
                    update = update if keep is None else update * keep.to(p.dtype)
                    target.add_(update, alpha=-lr * update_scale(p.shape))
        return loss


def _experts_whole(p: DTensor) -> bool:
    """A sharded (E, rows, cols) stack split only along E: every rank holds whole expert matrices."""
    # _StridedShard: FSDP's split of an already EP-sharded dim 0 (not a Shard subclass).
    return p.dim() == 3 and all(pl.is_replicate() or (isinstance(pl, (Shard, _StridedShard)) and pl.dim == 0)
                                for pl in p.placements)


def _whole_matrices(update: torch.Tensor) -> torch.Tensor:
    """What Newton-Schulz runs on for one parameter. Plain tensors and expert stacks sharded by expert are
    orthogonalised where they are (each expert is its own matrix, so the local experts' result is exact and needs
    no communication); a matrix FSDP split by rows is gathered whole: one all-gather per matrix, rather than the
    collectives DTensor would insert implicitly into every matmul of the iteration."""
    if not isinstance(update, DTensor):
        return update
    return update.to_local() if _experts_whole(update) else update.full_tensor()


def _local_slice(ortho: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's part of an orthogonalised update, in the layout of `p`'s local shard."""
    if not isinstance(p, DTensor) or _experts_whole(p):
        return ortho
    return distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None).to_local()
