"""One classifier-free-guided denoising step as a pure function, and that step captured whole in a CUDA graph.

After the first step every kernel of a step is the same kernel on the same shapes (static MoE shapes, text K/V
computed once), so the step can be recorded once and replayed: one launch instead of thousands, which is what
remains between the compiled step and the arithmetic floor on the released model (issue 12). The transformer's
forward has no host sync, which capture needs. `denoise_step` is exactly the pipeline's loop body, so a loop of
it reproduces `NucleusPipeline.__call__(output_type="latent")` bit for bit (tested on CPU).

    step = GraphedStep(partial(denoise_step, transformer, text_kv=kv, img_shapes=shapes, guidance_scale=4.0),
                       latents, t_R, sigma, sigma_next)
    for i in range(steps):
        latents = step(latents, t_N[i].expand(rows), sigmas[i], sigmas[i + 1]).clone()
"""

from __future__ import annotations

from typing import Callable

import torch

from nucleus_image.diffusion.flow import euler_step
from nucleus_image.diffusion.guidance import guided, uses_cfg


def denoise_step(transformer, latents_BSC: torch.Tensor, t_R: torch.Tensor, sigma: torch.Tensor,
                 sigma_next: torch.Tensor, *, text_kv, img_shapes, guidance_scale: float) -> torch.Tensor:
    """Float32 latents after one Euler step; conditional and unconditional rows in one forward when guiding."""
    x_BSC = latents_BSC.to(transformer.dtype)
    x_RSC = torch.cat([x_BSC, x_BSC]) if uses_cfg(guidance_scale) else x_BSC
    pred_RSC = transformer(hidden_states=x_RSC, img_shapes=img_shapes, timestep=t_R, text_kv=text_kv).sample
    return euler_step(latents_BSC, guided(pred_RSC.float(), guidance_scale), sigma, sigma_next)


class GraphedStep:
    """`step_fn(latents, t_R, sigma, sigma_next)` recorded once as a CUDA graph and replayed on every call.

    Calls copy their arguments into the graph's static inputs; the returned tensor is the graph's static output,
    overwritten by the next replay (clone it to keep it)."""

    def __init__(self, step_fn: Callable[..., torch.Tensor], latents: torch.Tensor, t_R: torch.Tensor,
                 sigma: torch.Tensor, sigma_next: torch.Tensor, warmup: int = 3):
        if not latents.is_cuda:
            raise ValueError(f"CUDA graphs need CUDA tensors; the latents are on {latents.device}. Use denoise_step "
                             f"directly elsewhere")
        self.static = [t.clone() for t in (latents, t_R, sigma, sigma_next)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):  # allocator and autotuning settle before capture
                step_fn(*self.static)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.output = step_fn(*self.static)

    def __call__(self, latents, t_R, sigma, sigma_next) -> torch.Tensor:
        for static, value in zip(self.static, (latents, t_R, sigma, sigma_next)):
            static.copy_(value)
        self.graph.replay()
        return self.output
