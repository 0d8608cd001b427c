"""SwiGLU feed-forward, laid out as diffusers' `FeedForward(activation_fn="swiglu")` so keys match
(`net.0.proj.weight`, `net.2.weight`). Note the reference's half order: value first, gate second."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


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
        return self.net[2](self.net[0](x))
