"""Which parameters Muon trains and which AdamW trains, and the two optimisers built from that split.

Muon (orthogonalised updates) suits weights that map one hidden representation to another, where the update's
spectral norm is what matters: attention projections, expert matrices, and the shared-expert and dense SwiGLU
matrices (the same hidden-to-hidden role as the experts; the recipe's "expert matrices" covers the MLP
family, and leaving the dense blocks on AdamW would train half of every block's MLP under a different
geometry). The per-block `encoder_proj` goes to Muon too: it is the text side of attention, mapping RMS-normed
text states into the keys/values' input space, a hidden-to-hidden map like `add_k_proj`/`add_v_proj`.

AdamW keeps what the recipe names and what Muon's reasoning does not cover: the patch embedding `img_in`
(raw input pixels/latents, not a normalised hidden state), the modulation projections `img_mod` and
`norm_out` (they produce per-channel scales/gates, where per-coordinate adaptivity matters), the output head
`proj_out`, the router `gate` (logits over experts, whose scale Muon would fix), the timestep embedder, and
every vector (norm weights, biases).

LoRA (peft) adapters follow the same rules by name: a factor of an attention or MLP matrix is a Muon matrix. The
factors peft puts on a routed-expert stack are 2-D tensors holding one small matrix per expert ((r*E, cols) and
(rows, r*E)); Muon gets them as views of E matrices (`expert_factors`), so each expert's factor is orthogonalised
and scaled on its own, exactly as the 8-bit experts' (E, ., r) / (E, r, .) factors are, and as one expert alone
would be.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from .config import OptimizerConfig
from .muon import ExpertFactor, Muon

# Matrices that stay on AdamW, by name (diffusers key names, which our model shares).
ADAMW_MATRIX_PATTERNS = (
    r"(^|\.)img_in\.",
    r"(^|\.)time_text_embed\.",
    r"\.img_mod\.",
    r"(^|\.)norm_out\.",
    r"(^|\.)proj_out\.",
    r"\.img_mlp\.gate\.",
)
MUON_ROLES = (
    ("attention", r"\.attn\."),
    ("text projection", r"\.encoder_proj\."),
    ("routed experts", r"\.img_mlp\.experts\."),
    ("shared expert", r"\.img_mlp\.shared_expert\."),
    ("dense MLP", r"\.img_mlp\."),
)


def split_params(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """{'muon': [...], 'adamw': [...]} over the trainable parameters, by the rules in the module docstring.
    A matrix that matches neither a Muon role nor an AdamW pattern is refused by name, so a new layer is
    placed deliberately rather than by accident."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"muon": [], "adamw": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or any(re.search(pat, name) for pat in ADAMW_MATRIX_PATTERNS):
            groups["adamw"].append((name, p))
        elif any(re.search(pat, name) for _, pat in MUON_ROLES):
            groups["muon"].append((name, p))
        else:
            raise ValueError(
                f"parameter {name!r} {tuple(p.shape)} matches no optimiser rule in nucleus_image.training.optim; add it to a Muon role or the AdamW patterns"
            )
    return groups


def expert_factors(model: nn.Module) -> dict[nn.Parameter, ExpertFactor]:
    """peft's LoRA factors of stacked-expert weights (`ParamWrapper` with more than one expert), each with its
    per-expert view: lora_A (r*E, cols) -> (E, r, cols), lora_B (rows, r*E) -> (E, rows, r), as peft itself
    splits them (`ParamWrapper.get_delta_factors`)."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # without peft there are no peft adapters
        return {}
    found = {}
    for module in model.modules():
        if isinstance(module, ParamWrapper) and module.num_experts > 1:
            for adapter in module.lora_A:
                found[module.lora_A[adapter].weight] = ExpertFactor(module.num_experts, dim=0)
                found[module.lora_B[adapter].weight] = ExpertFactor(module.num_experts, dim=1)
    return found


def describe_groups(groups: dict[str, list[tuple[str, nn.Parameter]]]) -> str:
    """A table of the split, by role, with parameter counts: printed at the start of training (an optimizer with
    no parameters, Muon under `kind` "adamw", is left out)."""
    rows = []
    for opt, members in groups.items():
        if not members:
            continue
        by_role: dict[str, list[int]] = {}
        for name, p in members:
            role = _role(name, p, opt)
            by_role.setdefault(role, [0, 0])
            by_role[role][0] += 1
            by_role[role][1] += p.numel()
        for role, (n, count) in sorted(by_role.items()):
            rows.append(f"  {opt:<6} {role:<26} {n:>4} tensors {count:>13,} params")
        rows.append(
            f"  {opt:<6} {'total':<26} {len(members):>4} tensors {sum(p.numel() for _, p in members):>13,} params"
        )
    return "optimizer groups:\n" + "\n".join(rows)


def _role(name: str, p: nn.Parameter, opt: str) -> str:
    if opt == "muon":
        role = next(r for r, pat in MUON_ROLES if re.search(pat, name))
        return role + (" (per expert)" if role == "routed experts" else "")
    if p.dim() < 2:
        return "vectors (norms, biases)"
    for label, key in (
        ("patch embedding", "img_in"),
        ("timestep embedder", "time_text_embed"),
        ("modulation", "img_mod"),
        ("modulation", "norm_out"),
        ("output head", "proj_out"),
        ("router", "img_mlp.gate"),
    ):
        if key in name:
            return label
    # Under `kind` "adamw" the hidden matrices are AdamW's too: named by the role they would have under Muon.
    return next((role for role, pat in MUON_ROLES if re.search(pat, name)), "other matrices")


def build_optimizers(
    model: nn.Module, cfg: OptimizerConfig, ns_dtype: torch.dtype
) -> tuple[Muon | None, torch.optim.AdamW, dict]:
    """The Muon and AdamW optimisers over the split; both take the same lr (Muon's update is RMS-matched).
    Weight decay applies to matrices only: decaying norm gains and biases only pulls them toward zero. With
    `cfg.kind` "adamw" (the baseline) AdamW takes every parameter and Muon is None. AdamW is torch's fused
    implementation: one kernel per parameter group, and the `found_inf` flag with which `step.train_step` skips a
    non-finite step on the device."""
    groups = split_params(model)
    if cfg.kind != "muon":
        groups = {"muon": [], "adamw": groups["adamw"] + groups["muon"]}
    muon = (
        None
        if not groups["muon"]
        else Muon(
            [p for _, p in groups["muon"]],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            momentum=cfg.muon_momentum,
            nesterov=cfg.muon_nesterov,
            ns_steps=cfg.muon_ns_steps,
            ns_dtype=ns_dtype,
            expert_factors=expert_factors(model),
        )
    )
    decay = [p for _, p in groups["adamw"] if p.dim() >= 2]
    no_decay = [p for _, p in groups["adamw"] if p.dim() < 2]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=True,
    )
    return muon, adamw, groups
