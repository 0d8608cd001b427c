"""Image-query attention over concat(image K/V, text K/V), with grouped-query heads.

Text tokens are keys and values only: they are projected per block from the RMS-normed text states, get
RMSNorm on keys and RoPE at positions after the image grid, and never produce queries. Because none of that
depends on the timestep, `text_kv` computes it once per prompt set and every denoising step reuses it.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .norms import RMSNorm
from .rope import apply_rope


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_k = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.to_v = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.add_k_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.add_v_proj = nn.Linear(dim, kv_heads * head_dim, bias=False)
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.norm_added_k = RMSNorm(head_dim, eps)
        # The checkpoint format carries a text-query norm although text never queries; kept so that the
        # state dict round-trips with diffusers. It takes no part in the computation.
        self.norm_added_q = RMSNorm(head_dim, eps)
        self.to_out = nn.ModuleList([nn.Linear(heads * head_dim, dim, bias=False)])

    def text_kv(self, context_BLD: torch.Tensor, txt_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text keys (normed, rotated) and values, (B, kv_heads, L, head_dim) each."""
        k = self.norm_added_k(self.add_k_proj(context_BLD).unflatten(-1, (self.kv_heads, -1))).transpose(1, 2)
        v = self.add_v_proj(context_BLD).unflatten(-1, (self.kv_heads, -1)).transpose(1, 2)
        return apply_rope(k, txt_rot), v

    def forward(
        self,
        x_BSD: torch.Tensor,
        img_rot: torch.Tensor,
        txt_k: torch.Tensor,
        txt_v: torch.Tensor,
        mask_B11K: torch.Tensor | None,
    ) -> torch.Tensor:
        q = self.norm_q(self.to_q(x_BSD).unflatten(-1, (self.heads, -1))).transpose(1, 2)
        k = self.norm_k(self.to_k(x_BSD).unflatten(-1, (self.kv_heads, -1))).transpose(1, 2)
        v = self.to_v(x_BSD).unflatten(-1, (self.kv_heads, -1)).transpose(1, 2)
        q = apply_rope(q, img_rot)
        k = torch.cat([apply_rope(k, img_rot), txt_k], dim=2)
        v = torch.cat([v, txt_v], dim=2)
        if mask_B11K is None:
            # No mask: SDPA may take its fastest kernel, and GQA heads are shared without copying.
            out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.heads != self.kv_heads)
        else:
            group = self.heads // self.kv_heads
            if group > 1:
                k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B11K)
        return self.to_out[0](out.transpose(1, 2).flatten(2).to(q.dtype))
