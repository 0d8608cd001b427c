"""The rectified-flow objective in the released sign convention, and the recipe's auxiliary terms (router
z-loss, router orthogonality, Haar wavelet loss).

Forward process (diffusers' FlowMatchEulerDiscreteScheduler): x_s = (1 - s) * x0 + s * noise, s = sigma in
[0, 1], integrated from s = 1 (noise) to s = 0 (data). Its velocity is dx_s/ds = noise - x0. The released
pipeline *negates* the transformer output before the Euler step x_{s'} = x_s + (s' - s) * (-out), so the
transformer itself must predict

    target = x0 - noise

(the direction from noise to data). `tests/test_timesteps.py` checks this by sampling with the Euler sampler
from an oracle that outputs exactly this target: it lands on x0.

`FlowObjective` composes them into the loss function the training step calls, `(model, FlowBatch) -> (loss,
logged values)`; fine-tuning uses it too, and another objective (distillation's) only has to keep that shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.latents import unpack_latents


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


@dataclass
class FlowBatch:
    """One micro-batch of the flow objective: packed clean latents, their noise and sigmas, the text states."""

    x0_BSC: torch.Tensor
    noise_BSC: torch.Tensor
    sigma_B: torch.Tensor
    text_BLD: torch.Tensor
    text_mask_BL: torch.Tensor | None
    grid: tuple[int, int]  # the latent (height, width) the tokens were packed from


@dataclass(frozen=True)
class FlowObjective:
    """The loss function of a training step: velocity MSE, plus the router z-loss and the Haar wavelet term when
    weighted. `routing_stats` adds the per-layer routing statistics (`monitor.routing_stats`, on the device) to
    the logged values; `input_dtype` casts the model's inputs (a bf16 or 8-bit pipeline's transformer)."""

    patch: int
    z_loss_weight: float = 0.0
    wavelet_weight: float = 0.0
    wavelet_levels: int = 2
    autocast: bool = False
    input_dtype: torch.dtype | None = None
    routing_stats: bool = False

    def __call__(self, model, batch: FlowBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from .monitor import routing_stats

        x0, noise, sigma = batch.x0_BSC, batch.noise_BSC, batch.sigma_B
        h, w = batch.grid
        B = x0.shape[0]
        cast = (lambda t: t.to(self.input_dtype)) if self.input_dtype is not None else (lambda t: t)
        routing = self.z_loss_weight > 0 or self.routing_stats
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = model(hidden_states=cast(noisy_latents(x0, noise, sigma)),
                        img_shapes=[(1, h // self.patch, w // self.patch)] * B,
                        encoder_hidden_states=cast(batch.text_BLD), encoder_hidden_states_mask=batch.text_mask_BL,
                        timestep=cast(sigma), **({"return_routing": True} if routing else {}))
        loss = flow_loss(out.sample, x0, noise)
        if self.z_loss_weight:
            loss = loss + self.z_loss_weight * router_z_loss(out.router_logits)
        if self.wavelet_weight:
            loss = loss + self.wavelet_weight * wavelet_loss(out.sample, x0, noise, h, w, self.patch,
                                                             self.wavelet_levels)
        logged = {}
        if self.routing_stats:
            logged["routing"] = routing_stats(out.router_logits, out.expert_indices, x0.shape[1])
        return loss, logged


def router_z_loss(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean over MoE layers and tokens of logsumexp(logits)^2 (ST-MoE): keeps router logits small so the
    softmax stays in a well-conditioned range, especially under bf16."""
    if not router_logits:
        return torch.zeros(())
    per_layer = [torch.logsumexp(logits.float(), dim=-1).pow(2).mean() for logits in router_logits]
    return torch.stack(per_layer).mean()


def router_orthogonality_loss(gate_weights: list[torch.Tensor]) -> torch.Tensor:
    """Mean over MoE layers of the mean squared cosine similarity between different experts' router rows: 0 when
    every pair of rows is orthogonal, 1 when all rows are parallel. The measure `decorrelate_router_rows_`
    descends; the trainer logs it (as `router/row_cos2`)."""
    if not gate_weights:
        return torch.zeros(())
    per_layer = []
    for w in gate_weights:
        u = torch.nn.functional.normalize(w.float(), dim=-1)
        E = u.shape[0]
        gram = u @ u.T
        off = gram - torch.eye(E, device=u.device, dtype=u.dtype)
        per_layer.append(off.pow(2).sum() / max(E * (E - 1), 1))
    return torch.stack(per_layer).mean()


@torch.no_grad()
def decorrelate_router_rows_(gate_weights: list[torch.Tensor], step: float) -> None:
    """The router orthogonality term, applied as a direct weight update after each optimizer step.

    The report lists "an orthogonality term 1e-7" without its form. Added to the loss at 1e-7 its gradient is
    ~5e-8 of the flow loss's and Muon/AdamW normalise it away: the router does not change. So the term acts
    directly: each expert's router row u_i (unit length) moves away from the others in proportion to their
    cosines, u_i <- normalise(u_i - step * sum_j c_ij u_j) (the tangent part of one descent step on the mean
    squared cosine), and keeps its own length (the logits' scale is the optimizer's and the z-loss's business).
    A pair at cosine c is left at about c (1 - 2 step); rows already orthogonal are not touched. Keeping the
    rows apart keeps experts from being picked by the same tokens, which expert choice cannot prevent alone."""
    for w in gate_weights:
        norms = w.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        u = w.float() / norms
        cos = u @ u.T
        cos.fill_diagonal_(0.0)
        push = cos @ u
        push -= (push * u).sum(-1, keepdim=True) * u  # tangent to the unit sphere: no change of length
        u = torch.nn.functional.normalize(u - step * push, dim=-1)
        w.copy_((u * norms).to(w.dtype))


def haar_details(x_BCHW: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """The detail sub-bands (LH, HL, HH stacked on a new dim 2) of an orthonormal 2-D Haar transform, finest
    level first; stops early when a side becomes odd."""
    out, low = [], x_BCHW
    for _ in range(levels):
        if low.shape[-1] % 2 or low.shape[-2] % 2 or min(low.shape[-2:]) < 2:
            break
        a, b = low[..., 0::2, 0::2], low[..., 0::2, 1::2]
        c, d = low[..., 1::2, 0::2], low[..., 1::2, 1::2]
        out.append(torch.stack([(a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2], dim=2))
        low = (a + b + c + d) / 2
    return out


def wavelet_loss(pred_BSD: torch.Tensor, x0_BSD: torch.Tensor, noise_BSD: torch.Tensor, height: int, width: int,
                 patch: int, levels: int = 2) -> torch.Tensor:
    """Mean over Haar levels of the mean squared detail coefficients of the velocity error, on the latent grid.

    The report adds "a wavelet loss 0.1 in the 1024 stage only" without its form. The plain MSE already counts
    every sub-band once (the transform is orthonormal), so this term adds weight on edges and texture, the
    detail the high-resolution stage is there to learn. The error is taken in velocity space, as the main loss
    is (the x0 error is the same field scaled by sigma)."""
    err = (pred_BSD.float() - velocity_target(x0_BSD, noise_BSD).float())
    bands = haar_details(unpack_latents(err, height, width, patch), levels)
    if not bands:
        return torch.zeros((), device=pred_BSD.device)
    return torch.stack([b.pow(2).mean() for b in bands]).mean()
