"""Shared builders for model tests: small configs, randomised weights, the diffusers reference twin."""

from __future__ import annotations

import torch

from nucleus_image.model import NucleusConfig, NucleusTransformer


def micro_config(**overrides) -> NucleusConfig:
    base = dict(
        in_channels=16,
        out_channels=4,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        joint_attention_dim=24,
        axes_dims_rope=(4, 6, 6),
        num_experts=4,
        moe_intermediate_dim=24,
        capacity_factors=(0.0, 2.0, 3.0, 1.5),
        dense_moe_strategy="leave_first_block_dense",
        mlp_ratio=4.0 * 128 / 64,  # hidden 64: lift the dense width past the reference's 128-rounding
    )
    base.update(overrides)
    return NucleusConfig(**base)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Every parameter random, norms and modulation included, so no term of the math hides behind a 1 or 0."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * scale
        p.copy_((1.0 + noise) if "norm" in name and p.ndim == 1 else noise * (2.0 if "gate.weight" in name else 1.0))
    return model


def reference_twin(ours: NucleusTransformer):
    """The diffusers class at the same config, holding our weights (strict key match)."""
    from diffusers import NucleusMoEImageTransformer2DModel

    cfg = {k: v for k, v in ours.config.to_dict().items() if not k.startswith("_") and k != "router_input"}
    cfg["use_grouped_mm"] = False  # the reference's CPU-portable expert loop
    ref = NucleusMoEImageTransformer2DModel(**cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ref.eval()


def inputs(cfg: NucleusConfig, batch=2, grid=(4, 6), text_len=7, seed=1, pad=None):
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    x = torch.randn(batch, h * w, cfg.in_channels, generator=g)
    txt = torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g)
    t = torch.rand(batch, generator=g)
    mask = None
    if pad is not None:
        mask = torch.ones(batch, text_len, dtype=torch.bool)
        for i, n in enumerate(pad):
            if n:
                mask[i, -n:] = False
    return dict(
        hidden_states=x,
        img_shapes=[(1, h, w)] * batch,
        encoder_hidden_states=txt,
        encoder_hidden_states_mask=mask,
        timestep=t,
    )


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()
