"""One denoising step, the only copy of it: the pipeline loops over it, the CUDA-graph path captures it
(cuda_graph.py) and the GPU benchmark times it.

A step: the latents in the transformer's dtype, doubled into conditional and unconditional rows when guiding (one
batched forward for both), the transformer's velocity (optionally through a step cache's `block_stack`), guidance,
and the Euler update in float32.

    latents = denoise_step(transformer, latents, t_N[i].expand(rows), sigmas[i], sigmas[i + 1],
                           text_kv=kv, img_shapes=shapes, guidance_scale=4.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nucleus_image.diffusion.flow import euler_step
from nucleus_image.diffusion.guidance import guided, uses_cfg
from nucleus_image.model import TextKV


def denoise_step(
    transformer: Any,
    latents_BSC: torch.Tensor,
    t_R: torch.Tensor,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    *,
    text_kv: TextKV,
    img_shapes: list,
    guidance_scale: float,
    block_stack: Callable | None = None,
) -> torch.Tensor:
    """Float32 latents after one Euler step from `sigma` to `sigma_next`. `t_R` holds the timestep of every
    transformer row (2B when guiding). `transformer` is a NucleusTransformer or a wrapper that forwards its calls and
    `dtype` (torch.compile's, peft's). Without `block_stack` the transformer is called without that keyword."""
    x_BSC = latents_BSC.to(transformer.dtype)
    x_RSC = torch.cat([x_BSC, x_BSC]) if uses_cfg(guidance_scale) else x_BSC
    seam = {} if block_stack is None else {"block_stack": block_stack}
    pred_RSC = transformer(
        hidden_states=x_RSC, img_shapes=img_shapes, timestep=t_R, text_kv=text_kv, return_dict=True, **seam
    ).sample
    return euler_step(latents_BSC, guided(pred_RSC.float(), guidance_scale), sigma, sigma_next)
