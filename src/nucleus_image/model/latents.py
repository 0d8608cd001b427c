"""The transformer's token layout of latents: each p x p patch of a (B, C, H, W) latent grid is one token of
C*p*p channels, rows of patches in raster order. Generation, training and evaluation all speak this layout.

    tokens_BSC = pack_latents(latents_BCHW, patch=2)
    latents_BCHW = unpack_latents(tokens_BSC, height, width, patch=2)
"""

from __future__ import annotations

import torch


def pack_latents(latents_BCHW: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, C*p*p): each p x p patch of latent pixels becomes one token."""
    B, C, H, W = latents_BCHW.shape
    x = latents_BCHW.view(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // patch) * (W // patch), C * patch * patch)


def unpack_latents(tokens_BSC: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Inverse of pack_latents for a latent grid of height x width."""
    B, _, C = tokens_BSC.shape
    x = tokens_BSC.view(B, height // patch, width // patch, C // (patch * patch), patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, C // (patch * patch), height, width)
