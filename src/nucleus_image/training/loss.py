"""The rectified-flow objective in the released sign convention, and the router z-loss.

Forward process (diffusers' FlowMatchEulerDiscreteScheduler): x_s = (1 - s) * x0 + s * noise, s = sigma in
[0, 1], integrated from s = 1 (noise) to s = 0 (data). Its velocity is dx_s/ds = noise - x0. The released
pipeline *negates* the transformer output before the Euler step x_{s'} = x_s + (s' - s) * (-out), so the
transformer itself must predict

    target = x0 - noise

(the direction from noise to data). `tests/test_timesteps.py` checks this by sampling with the Euler sampler
from an oracle that outputs exactly this target: it lands on x0.
"""

from __future__ import annotations

import torch


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma_B: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) x0 + s noise, with one sigma per sample broadcast over the remaining dims."""
    s = sigma_B.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformer predicts (see the module docstring for the sign)."""
    return x0 - noise


def flow_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Velocity MSE, in float32 whatever the autocast dtype."""
    return torch.mean((pred.float() - velocity_target(x0, noise).float()) ** 2)


def router_z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over MoE layers and tokens of logsumexp(logits)^2 (ST-MoE): keeps router logits small so the
    softmax stays in a well-conditioned range, especially under bf16."""
    if not router_logits:
        return torch.zeros(())
    per_layer = [torch.logsumexp(logits.float(), dim=-1).pow(2).mean() for logits in router_logits]
    return torch.stack(per_layer).mean()
