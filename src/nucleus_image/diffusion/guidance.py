"""Classifier-free guidance as the released model uses it, on one batched forward.

The conditional and unconditional rows run through the transformer together (rows [0, B) conditional,
[B, 2B) unconditional). Expert-choice routing picks tokens per sample and attention never mixes samples, so the
batched forward is exactly two separate ones, at one launch per layer instead of two. The combination is
`neg + g * (pos - neg)`, rescaled per token to the norm of the conditional prediction, which keeps large
guidance scales from blowing up the velocity's magnitude.
"""

from __future__ import annotations

import torch


def uses_cfg(guidance_scale: float) -> bool:
    """Guidance at or below 1 is the conditional prediction alone, so the unconditional rows are skipped."""
    return guidance_scale > 1


def combine(cond_BSC: torch.Tensor, uncond_BSC: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """`uncond + g * (cond - uncond)` with each token's vector rescaled to the conditional one's norm.

    A token whose combined vector is exactly zero stays zero (the reference divides 0 by 0 there and turns the
    whole image to NaN, which a freshly initialised, zero-output model hits on its first step)."""
    comb_BSC = uncond_BSC + guidance_scale * (cond_BSC - uncond_BSC)
    cond_norm_BS1 = torch.norm(cond_BSC, dim=-1, keepdim=True)
    comb_norm_BS1 = torch.norm(comb_BSC, dim=-1, keepdim=True)
    return comb_BSC * (cond_norm_BS1 / torch.where(comb_norm_BS1 > 0, comb_norm_BS1, 1.0))


def guided(pred_NSC: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Reduce one batched forward's output to the guided prediction.

    With CFG the batch holds 2B rows (conditional first); without it, B conditional rows returned unchanged.
    """
    if not uses_cfg(guidance_scale):
        return pred_NSC
    cond_BSC, uncond_BSC = pred_NSC.chunk(2, dim=0)
    return combine(cond_BSC, uncond_BSC, guidance_scale)
