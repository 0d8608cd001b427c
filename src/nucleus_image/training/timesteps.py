"""Training sigmas: logit-normal with a resolution-dependent mean, mixed with a uniform share.

sigma = sigmoid(mu + std * n), n ~ N(0, 1). Shifting the logit by mu is exactly the released scheduler's
exponential time shift sigma' = e^mu * sigma / (e^mu * sigma + 1 - sigma) applied to a centred logit-normal,
so training spends its noise levels where inference with that shift spends its steps: larger images keep
their structure at higher noise, hence more mass at high sigma. mu is linear in the image token count,
mu_min at seq_min tokens to mu_max at seq_max (the released `calculate_shift` line); the uniform share keeps
every noise level trained.
"""

from __future__ import annotations

import torch

from .config import TimestepConfig


def shift_mu(seq_len: int, cfg: TimestepConfig) -> float:
    """mu for an image of `seq_len` tokens: 0.5 @ 256 -> 1.15 @ 4096 with the default config (extrapolated
    linearly outside that range, as the released scheduler does)."""
    slope = (cfg.mu_max - cfg.mu_min) / (cfg.seq_max - cfg.seq_min)
    return cfg.mu_min + slope * (seq_len - cfg.seq_min)


def sample_sigmas(batch: int, seq_len: int, cfg: TimestepConfig, generator: torch.Generator) -> torch.Tensor:
    """(batch,) float32 sigmas in (0, 1) on the generator's device; t = sigma is what the transformer sees."""
    device = generator.device
    normal = torch.randn(batch, generator=generator, device=device)
    uniform = torch.rand(batch, generator=generator, device=device)
    pick_uniform = torch.rand(batch, generator=generator, device=device) < cfg.uniform_share
    logit_normal = torch.sigmoid(shift_mu(seq_len, cfg) + cfg.std * normal)
    return torch.where(pick_uniform, uniform, logit_normal)
