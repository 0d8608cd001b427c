"""Expert-choice mixture of experts with a shared expert and decoupled routing.

Routing: the router scores every image token against every expert from concat(timestep embedding, token).
With `router_input="decoupled"` (the release) the token is the *unmodulated* LayerNorm output, so content
decides routing and the timestep is an additive channel; with "coupled" it is the modulated token the experts
compute on, which lets the timestep's scale dominate the logits. Per sample, each expert then takes its top
C = max(1, ceil(CF * S / E)) tokens by affinity (expert choice). A token's picked affinities are renormalised
to sum to one over the experts that picked it, times route_scale, and the weighted expert outputs are added to
a shared SwiGLU expert that sees every token.

Because every expert takes exactly C tokens, all shapes are static: tokens are gathered to (E, B*C, D), run
through the experts as two batched matmuls, weighted and scatter-added back. No host sync, no padding.

`router_type="token_choice"` is the comparison arm: each token picks its top-k experts by score, and each expert
keeps at most the same C slots per sample, so expert compute and every shape are those of expert choice at the
same capacity factor. Picks past an expert's C slots are dropped (GShard/Switch priority: every token's first
choice in sequence order, then every second choice, ...). A slot left empty holds the sentinel token id S in
`Routing.indices_BEC` (one past the last token, so a consumer that forgets to mask it fails on an out-of-range
index instead of miscounting a real token); inside the layer it computes on the sample's last token with weight 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ROUTER_TYPES
from .fused import dispatch_plan, fused_ops
from .mlp import SwiGLU


@dataclass
class Routing:
    """What one MoE layer decided for a batch: router logits (B, S, E) and chosen token indices (B, E, C).
    With token choice, a slot no token filled holds S (the sequence length): mask `indices_BEC < S`."""

    logits_BSE: torch.Tensor
    indices_BEC: torch.Tensor


def expert_capacity(capacity_factor: float, seq_len: int, num_experts: int) -> int:
    """C = max(1, ceil(CF * S / E)): the tokens each expert takes per sample of S image tokens."""
    c = max(1, math.ceil(capacity_factor * seq_len / num_experts))
    if c > seq_len:
        raise ValueError(
            f"capacity factor {capacity_factor} gives C={c} tokens per expert for a sequence of {seq_len} "
            f"image tokens with {num_experts} experts; C must be <= {seq_len}, so use a capacity factor "
            f"<= {num_experts} or a larger image"
        )
    return c


class SwiGLUExperts(nn.Module):
    """E SwiGLU experts stored pre-transposed: gate_up_proj (E, D, 2F) = [gate | up], down_proj (E, F, D)."""

    def __init__(self, dim: int, inner: int, num_experts: int, kernels: str = "eager"):
        super().__init__()
        self.kernels = kernels
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, dim, 2 * inner))
        self.down_proj = nn.Parameter(torch.empty(num_experts, inner, dim))

    def forward(self, x_ETD: torch.Tensor) -> torch.Tensor:
        if self.kernels == "triton":
            return torch.bmm(fused_ops(x_ETD.device).swiglu(torch.bmm(x_ETD, self.gate_up_proj), True), self.down_proj)
        gate, up = torch.bmm(x_ETD, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(F.silu(gate) * up, self.down_proj)


class MoELayer(nn.Module):
    def __init__(
        self,
        dim: int,
        inner: int,
        num_experts: int,
        capacity_factor: float,
        use_sigmoid: bool,
        route_scale: float,
        kernels: str = "eager",
        router_type: str = "expert_choice",
        top_k: int = 2,
    ):
        super().__init__()
        if router_type not in ROUTER_TYPES:
            raise ValueError(f"unknown router_type {router_type!r}; accepted: {', '.join(ROUTER_TYPES)}")
        if router_type == "token_choice" and not 1 <= top_k <= num_experts:
            raise ValueError(f"token choice needs 1 <= top_k <= num_experts={num_experts}, got top_k={top_k}")
        self.kernels = kernels
        self.router_type = router_type
        self.top_k = top_k
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.use_sigmoid = use_sigmoid
        self.route_scale = route_scale
        self.gate = nn.Linear(2 * dim, num_experts, bias=False)
        self.experts = SwiGLUExperts(dim, inner, num_experts, kernels=kernels)
        self.shared_expert = SwiGLU(dim, inner, kernels=kernels)

    def capacity(self, seq_len: int) -> int:
        return expert_capacity(self.capacity_factor, seq_len, self.num_experts)

    def forward(
        self, x_mod_BSD: torch.Tensor, router_in_BSD: torch.Tensor, temb_BD: torch.Tensor
    ) -> tuple[torch.Tensor, Routing]:
        B, S, D = x_mod_BSD.shape
        E, C = self.num_experts, self.capacity(S)
        logits = self.gate(torch.cat([temb_BD.unsqueeze(1).expand(-1, S, -1), router_in_BSD], dim=-1))
        scores = torch.sigmoid(logits.float()) if self.use_sigmoid else F.softmax(logits.float(), dim=-1)
        scores = scores.to(logits.dtype)

        if self.router_type == "token_choice":
            idx_BEC = self._token_choice_slots(scores, C)
            # Empty slots (index S) compute on the sample's last token with weight 0: a real row, so nothing can
            # turn it into NaN, and the same dispatch as expert choice below.
            slot_idx_BEC = idx_BEC.clamp(max=S - 1)
            gating_BEC = scores.transpose(1, 2).gather(-1, slot_idx_BEC) * (idx_BEC < S).to(scores.dtype)
        else:
            gating_BEC, idx_BEC = torch.topk(scores.transpose(1, 2), k=C, dim=-1)
            slot_idx_BEC = idx_BEC
        # Flat token ids in expert-major order (E, B*C), the order the experts consume them.
        offsets_B11 = torch.arange(B, device=idx_BEC.device).view(B, 1, 1) * S
        flat_idx = (slot_idx_BEC + offsets_B11).transpose(0, 1).reshape(-1)
        gating = gating_BEC.transpose(0, 1).reshape(-1)
        if self.kernels == "triton":
            return self._dispatch_fused(x_mod_BSD, flat_idx, gating, C), Routing(logits, idx_BEC)
        # Renormalise each token's picked affinities over the experts that picked it.
        token_sums = torch.zeros(B * S, device=gating.device, dtype=gating.dtype).scatter_add_(0, flat_idx, gating)
        gating = gating / (token_sums.index_select(0, flat_idx) + 1e-12) * self.route_scale

        x_flat = x_mod_BSD.reshape(B * S, D)
        # index_select, not x_flat[flat_idx]: the same values, but its backward is index_add, which sums in a
        # fixed order on CPU, while advanced indexing's backward (index_put with accumulate) does not with
        # several threads, so training would not be reproducible run to run.
        routed = self.experts(x_flat.index_select(0, flat_idx).view(E, B * C, D)).reshape(E * B * C, D)
        routed = (routed.float() * gating.unsqueeze(-1)).to(x_mod_BSD.dtype)
        out = self.shared_expert(x_mod_BSD).reshape(B * S, D)
        out = out.scatter_add(0, flat_idx.unsqueeze(-1).expand(-1, D), routed)
        return out.view(B, S, D), Routing(logits, idx_BEC)

    def _token_choice_slots(self, scores_BSE: torch.Tensor, C: int) -> torch.Tensor:
        """(B, E, C) token ids each expert keeps under token choice, S where a slot stays empty. Every token picks
        its top-k experts; an expert fills its C slots in priority order (all first choices in sequence order,
        then all second choices, ... as GShard does) and drops the rest. Static shapes and no host sync: a running
        count of each expert's picks (cumsum) and, for slot c, the first pick that brings the count to c + 1."""
        B, S, E = scores_BSE.shape
        k = self.top_k
        picks_BKS = scores_BSE.topk(k, dim=-1).indices.transpose(1, 2)  # (B, k, S): rank-major = priority order
        # (B, k*S, E), one row per (rank, token). A scatter, not F.one_hot, which reads the ids' range back on a CPU.
        picked_BRE = torch.zeros(B, k * S, E, dtype=torch.long, device=scores_BSE.device)
        picked_BRE.scatter_(2, picks_BKS.reshape(B, k * S, 1), 1)
        count_BER = picked_BRE.cumsum(1).transpose(1, 2).contiguous()  # picks expert e has seen up to row r
        wanted_BEC = torch.arange(1, C + 1, device=scores_BSE.device).expand(B, E, C).contiguous()
        row_BEC = torch.searchsorted(count_BER, wanted_BEC)  # k*S where the expert has fewer than c + 1 picks
        return torch.where(row_BEC < k * S, row_BEC % S, S)

    def _dispatch_fused(
        self, x_mod_BSD: torch.Tensor, flat_idx: torch.Tensor, gating: torch.Tensor, C: int
    ) -> torch.Tensor:
        """The eager path's gather, renormalisation and weighted scatter-add on the expert-dispatch kernels: every
        sum over a token's picks runs in the picks' order (no atomics, so reproducible on a GPU too), and the
        weighting and the shared expert's add happen in the combine's one pass."""
        B, S, D = x_mod_BSD.shape
        ops = fused_ops(x_mod_BSD.device)
        order, offsets = dispatch_plan(flat_idx, B * S)
        token_sums = ops.expert_combine(None, gating.unsqueeze(-1), None, flat_idx, order, offsets)
        picked_sums = ops.expert_gather(token_sums, flat_idx, order, offsets).squeeze(-1)
        gating = gating / (picked_sums + 1e-12) * self.route_scale
        rows = ops.expert_gather(x_mod_BSD.reshape(B * S, D), flat_idx, order, offsets)
        routed = self.experts(rows.view(self.num_experts, B * C, D)).reshape(-1, D)
        shared = self.shared_expert(x_mod_BSD).reshape(B * S, D)
        return ops.expert_combine(shared, routed, gating, flat_idx, order, offsets).view(B, S, D)
