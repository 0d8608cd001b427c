"""The rectified-flow objective in the released sign convention, and the recipe's auxiliary terms (router
z-loss, router orthogonality, Haar wavelet loss), plus a Switch-style load-balance loss for router comparisons.

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
from typing import TYPE_CHECKING

import torch

from ..model.latents import unpack_latents

if TYPE_CHECKING:
    from .alignment import AlignmentTerm
    from .binding import BindingTerm


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


def contrastive_negatives(captions: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """For contrastive flow matching: each row's negative is the next row (a roll by one, so no random number
    is drawn and the run's random streams are unchanged), and whether the pair counts. A pair does not count when
    either caption is empty (an unconditional row has no condition to tell apart, and it is what classifier-free
    guidance subtracts) or both captions are equal (in a small domain the same prompt recurs: pushing its two
    images apart would push the model away from a correct answer). Returns (index (B,), weight (B,) float) on
    `device`, made there while the batch is prepared: the loss would otherwise copy them in the middle of the step,
    a host-to-device copy that waits for the device."""
    following = [(i + 1) % len(captions) for i in range(len(captions))]
    index = torch.tensor(following)
    weight = torch.tensor(
        [float(bool(a) and bool(captions[j]) and a != captions[j]) for a, j in zip(captions, following)]
    )
    return index.to(device, non_blocking=True), weight.to(device, non_blocking=True)


def contrastive_flow_loss(
    pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, index: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """The contrastive term of contrastive flow matching (DeltaFM, arXiv 2506.05350), to be *subtracted* with a
    small weight lambda: the mean squared distance of the prediction from another sample's velocity target,
    mean over the rows whose pair counts (`contrastive_negatives`). The paper's objective is
    ||v - v+||^2 - lambda ||v - v-||^2 with lambda = 0.05: it pushes conditional predictions apart so that
    different conditions give different flows. Rows are weighted, so the shape stays static (no host sync)."""
    negative = velocity_target(x0, noise).float().index_select(0, index)
    per_row = (pred.float() - negative).pow(2).flatten(1).mean(1)
    w = weight.float()
    return (per_row * w).sum() / w.sum().clamp_min(1.0)


@dataclass
class FlowBatch:
    """One micro-batch of the flow objective: packed clean latents, their noise and sigmas, the text states."""

    x0_BSC: torch.Tensor
    noise_BSC: torch.Tensor
    sigma_B: torch.Tensor
    text_BLD: torch.Tensor
    text_mask_BL: torch.Tensor | None
    grid: tuple[int, int]  # the latent (height, width) the tokens were packed from
    # Contrastive flow matching's pairs (`contrastive_negatives`): each row's negative row and whether it counts.
    negatives: tuple[torch.Tensor, torch.Tensor] | None = None
    # The alignment head's per-token targets (`alignment.token_targets`), (B, S, K).
    token_targets_BSK: torch.Tensor | None = None
    # The binding loss's (cover (B, S, P), caption words (B, L, P)) (`binding.binding_targets`).
    binding_targets: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class FlowObjective:
    """The loss function of a training step: velocity MSE, plus the router z-loss and the Haar wavelet term when
    weighted. `routing_stats` adds the per-layer routing statistics (`monitor.routing_stats`, on the device) to
    the logged values; `input_dtype` casts the model's inputs (a bf16 or 8-bit pipeline's transformer).

    Training-only levers: `contrastive_weight` subtracts contrastive flow matching's term (`contrastive_flow_loss`,
    on the batch's `negatives`); `alignment` (an `alignment.AlignmentTerm`: a head outside the model reading a
    block's tokens) adds its weighted per-token loss against the batch's `token_targets_BSK` and logs it (a device
    tensor) as "alignment"; `binding` (a `binding.BindingTerm`: taps on blocks' attention) adds the weighted loss
    of their image-to-text attention against the batch's `binding_targets`, logged as "binding";
    `load_balance_weight` adds the weighted `load_balance_loss` over the tokens' top `load_balance_top_k` experts
    (the model's router_top_k) and logs it as "load_balance"."""

    patch: int
    z_loss_weight: float = 0.0
    wavelet_weight: float = 0.0
    wavelet_levels: int = 2
    autocast: bool = False
    input_dtype: torch.dtype | None = None
    routing_stats: bool = False
    contrastive_weight: float = 0.0
    alignment: AlignmentTerm | None = None
    binding: BindingTerm | None = None
    # Switch-style load balance (`load_balance_loss`) over each token's top `load_balance_top_k` experts.
    load_balance_weight: float = 0.0
    load_balance_top_k: int = 2

    def __call__(self, model, batch: FlowBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from .monitor import routing_stats

        x0, noise, sigma = batch.x0_BSC, batch.noise_BSC, batch.sigma_B
        h, w = batch.grid
        B = x0.shape[0]
        cast = (lambda t: t.to(self.input_dtype)) if self.input_dtype is not None else (lambda t: t)
        routing = self.z_loss_weight > 0 or self.load_balance_weight > 0 or self.routing_stats
        with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = model(
                hidden_states=cast(noisy_latents(x0, noise, sigma)),
                img_shapes=[(1, h // self.patch, w // self.patch)] * B,
                encoder_hidden_states=cast(batch.text_BLD),
                encoder_hidden_states_mask=batch.text_mask_BL,
                timestep=cast(sigma),
                **({"return_routing": True} if routing else {}),
            )
        loss = flow_loss(out.sample, x0, noise)
        logged = {}
        if self.contrastive_weight:
            if batch.negatives is None:
                raise ValueError("contrastive_weight > 0 needs the batch's negatives (FlowBatch.negatives)")
            loss = loss - self.contrastive_weight * contrastive_flow_loss(out.sample, x0, noise, *batch.negatives)
        if self.alignment is not None:
            aligned = self.alignment.loss(batch.token_targets_BSK)
            loss = loss + self.alignment.weight * aligned
            logged["alignment"] = aligned.detach()
        if self.binding is not None:
            bound = self.binding.loss(batch.text_mask_BL, batch.binding_targets)
            loss = loss + self.binding.weight * bound
            logged["binding"] = bound.detach()
        if self.z_loss_weight:
            loss = loss + self.z_loss_weight * router_z_loss(out.router_logits)
        if self.load_balance_weight:
            balance = load_balance_loss(out.router_logits, self.load_balance_top_k)
            loss = loss + self.load_balance_weight * balance
            logged["load_balance"] = balance.detach()
        if self.wavelet_weight:
            loss = loss + self.wavelet_weight * wavelet_loss(
                out.sample, x0, noise, h, w, self.patch, self.wavelet_levels
            )
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


def load_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Mean over MoE layers of E * sum_i f_i * P_i (Switch Transformer), over all tokens of the batch: f_i is the
    share of the tokens' top-k picks that go to expert i (before any capacity drop, counted on the logits, whose
    order is the scores' for a softmax or a sigmoid router), P_i the mean softmax probability of expert i. It is 1
    when picks and probability are uniform and grows as both pile onto the same experts; only P carries a
    gradient. With expert choice every expert still takes C tokens: the term then balances the tokens' preferences
    (what token choice would route), which expert choice does not need but a controlled comparison may add."""
    if not router_logits:
        return torch.zeros(())
    per_layer = []
    for logits in router_logits:
        E = logits.shape[-1]
        flat = logits.float().reshape(-1, E)
        picks = torch.zeros_like(flat).scatter_(1, flat.topk(top_k, dim=-1).indices, 1.0)
        f_E = picks.mean(0) / top_k
        P_E = torch.softmax(flat, dim=-1).mean(0)
        per_layer.append(E * (f_E * P_E).sum())
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


def wavelet_loss(
    pred_BSD: torch.Tensor,
    x0_BSD: torch.Tensor,
    noise_BSD: torch.Tensor,
    height: int,
    width: int,
    patch: int,
    levels: int = 2,
) -> torch.Tensor:
    """Mean over Haar levels of the mean squared detail coefficients of the velocity error, on the latent grid.

    The report adds "a wavelet loss 0.1 in the 1024 stage only" without its form. The plain MSE already counts
    every sub-band once (the transform is orthonormal), so this term adds weight on edges and texture, the
    detail the high-resolution stage is there to learn. The error is taken in velocity space, as the main loss
    is (the x0 error is the same field scaled by sigma)."""
    err = pred_BSD.float() - velocity_target(x0_BSD, noise_BSD).float()
    bands = haar_details(unpack_latents(err, height, width, patch), levels)
    if not bands:
        return torch.zeros((), device=pred_BSD.device)
    return torch.stack([b.pow(2).mean() for b in bands]).mean()
