"""SwiGLU feed-forward, laid out as diffusers' `FeedForward(activation_fn="swiglu")` so keys match
(`net.0.proj.weight`, `net.2.weight`). Note the reference's half order: value first, gate second."""

from __future__ import annotations

from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused import fused_ops


class _GatedProj(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.silu(gate)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, inner: int, kernels: str = "eager"):
        super().__init__()
        self.kernels = kernels
        # Index 1 is the reference's (no-op) dropout; the list keeps checkpoint keys identical.
        self.net = nn.ModuleList([_GatedProj(dim, inner), nn.Identity(), nn.Linear(inner, dim, bias=False)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "triton":  # the fused activation reads the projection's two halves in place
            return self.net[2](fused_ops(x.device).swiglu(cast(_GatedProj, self.net[0]).proj(x), False))
        return self.net[2](self.net[0](x))
