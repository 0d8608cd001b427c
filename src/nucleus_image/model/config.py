"""Typed configuration of the Nucleus MoE transformer.

Field names mirror the diffusers `NucleusMoEImageTransformer2DModel` config keys, so a released config.json maps
onto it one to one. `router_input` is ours: "decoupled" (the released design) or "coupled" (the LLM-style
router on the modulated token, kept for the ablation the announcement describes). So are `router_type` and
`router_top_k`: "expert_choice" (the release) or "token_choice" (each token picks its top `router_top_k`
experts, each expert keeping at most the same C tokens, for a comparison at equal expert compute).

    NucleusConfig.preset("released")   # the 17B released model
    NucleusConfig.preset("tiny").replace(num_layers=6)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nucleus_image.kernels.runtime import KERNEL_CHOICES

DENSE_MOE_STRATEGIES = (
    "leave_first_three_and_last_block_dense",
    "leave_first_three_blocks_dense",
    "leave_first_block_dense",
    "all_moe",
    "all_dense",
)
ROUTER_INPUTS = ("decoupled", "coupled")
ROUTER_TYPES = ("expert_choice", "token_choice")


def is_moe_layer(strategy: str, layer_idx: int, num_layers: int) -> bool:
    """Which blocks carry experts, as the diffusers reference decides it."""
    if strategy == "leave_first_three_and_last_block_dense":
        return 3 <= layer_idx < num_layers - 1
    if strategy == "leave_first_three_blocks_dense":
        return layer_idx >= 3
    if strategy == "leave_first_block_dense":
        return layer_idx >= 1
    if strategy == "all_moe":
        return True
    if strategy == "all_dense":
        return False
    raise ValueError(f"unknown dense_moe_strategy {strategy!r}; accepted: {', '.join(DENSE_MOE_STRATEGIES)}")


@dataclass(frozen=True)
class NucleusConfig:
    patch_size: int = 2
    in_channels: int = 64
    # None (diffusers' default for both) means in_channels / num_attention_heads: __post_init__ fills it in, so
    # the attribute is always an int.
    out_channels: int = 16
    num_layers: int = 32
    attention_head_dim: int = 128
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    joint_attention_dim: int = 4096
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    mlp_ratio: float = 4.0
    moe_enabled: bool = True
    dense_moe_strategy: str = "leave_first_three_blocks_dense"
    num_experts: int = 64
    moe_intermediate_dim: int = 1344
    capacity_factors: tuple[float, ...] = field(default_factory=lambda: (0.0,) * 3 + (4.0,) * 2 + (2.0,) * 27)
    use_sigmoid: bool = False
    route_scale: float = 2.5
    # Accepted for config compatibility; our expert path is a batched matmul over equal-size expert groups,
    # which expert choice makes possible and which is faster than grouped_mm on the same shapes.
    use_grouped_mm: bool = True
    router_input: str = "decoupled"
    # "expert_choice" (the release: each expert takes its top C tokens) or "token_choice" (each token picks its
    # top router_top_k experts; an expert keeps at most the same C, the rest are dropped). router_top_k is read by
    # token choice only (and by the training's load-balance loss, for either router).
    router_type: str = "expert_choice"
    router_top_k: int = 2
    # How the blocks run, not what they compute: "eager" (PyTorch ops) or "triton" (the fused kernels of
    # nucleus_image.kernels, equal to eager within rounding). Not written to config.json.
    kernels: str = "eager"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass normalisation)
        cf = self.capacity_factors
        set_(
            "capacity_factors",
            tuple(float(c) for c in (cf if isinstance(cf, (list, tuple)) else [cf] * self.num_layers)),
        )
        set_("axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if self.out_channels is None:
            set_("out_channels", self.in_channels)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        self.validate()

    def validate(self) -> None:
        errors = []
        if self.dense_moe_strategy not in DENSE_MOE_STRATEGIES:
            errors.append(
                f"unknown dense_moe_strategy {self.dense_moe_strategy!r}; accepted: {', '.join(DENSE_MOE_STRATEGIES)}"
            )
        if self.router_input not in ROUTER_INPUTS:
            errors.append(f"unknown router_input {self.router_input!r}; accepted: {', '.join(ROUTER_INPUTS)}")
        if self.router_type not in ROUTER_TYPES:
            errors.append(f"unknown router_type {self.router_type!r}; accepted: {', '.join(ROUTER_TYPES)}")
        if self.router_top_k < 1 or (self.router_type == "token_choice" and self.router_top_k > self.num_experts):
            errors.append(
                f"router_top_k={self.router_top_k} must be >= 1 and, with token choice, <= num_experts={self.num_experts}"
            )
        if self.kernels not in KERNEL_CHOICES:
            errors.append(f"unknown kernels {self.kernels!r}; accepted: {', '.join(KERNEL_CHOICES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            errors.append(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if len(self.axes_dims_rope) != 3 or sum(self.axes_dims_rope) != self.attention_head_dim:
            errors.append(
                f"axes_dims_rope={self.axes_dims_rope} must be 3 even dims summing to attention_head_dim={self.attention_head_dim}"
            )
        if any(a % 2 for a in self.axes_dims_rope):
            errors.append(f"axes_dims_rope={self.axes_dims_rope} must all be even")
        if len(self.capacity_factors) != self.num_layers:
            errors.append(
                f"capacity_factors has {len(self.capacity_factors)} entries, expected num_layers={self.num_layers}"
            )
        if self.in_channels % (self.patch_size**2):
            errors.append(f"in_channels={self.in_channels} must be a multiple of patch_size**2={self.patch_size**2}")
        if self.dense_mlp_dim < 1:
            errors.append(
                f"dense MLP width int(dim*mlp_ratio*2/3)//128*128 is 0 for hidden size {self.hidden_size}; use a hidden size >= 96"
            )
        if not errors:
            bad = [i for i in self.moe_layers if self.capacity_factors[i] <= 0]
            if bad:
                errors.append(
                    f"MoE layers {bad} have capacity factor <= 0 in capacity_factors={list(self.capacity_factors)}"
                )
        if errors:
            raise ValueError("invalid NucleusConfig: " + "; ".join(errors))

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def dense_mlp_dim(self) -> int:
        # The reference's rounding: SwiGLU at 2/3 of mlp_ratio, down to a multiple of 128 (5376 for the release).
        return int(self.hidden_size * self.mlp_ratio * 2 / 3) // 128 * 128

    @property
    def moe_layers(self) -> list[int]:
        if not self.moe_enabled:
            return []
        return [i for i in range(self.num_layers) if is_moe_layer(self.dense_moe_strategy, i, self.num_layers)]

    @property
    def latent_channels(self) -> int:
        return self.in_channels // self.patch_size**2

    def capacity(self, layer_idx: int, seq_len: int) -> int:
        """Tokens each expert takes in a layer: C = max(1, ceil(CF * S / E))."""
        return max(1, math.ceil(self.capacity_factors[layer_idx] * seq_len / self.num_experts))

    def param_counts(self) -> dict[str, int]:
        """Total and per-token active parameters, counted from the shapes (no model built)."""
        d, L, E, F = self.hidden_size, self.num_layers, self.num_experts, self.moe_intermediate_dim
        kv = self.num_key_value_heads * self.attention_head_dim
        attn = d * d * 2 + d * kv * 2 + kv * d * 2 + 4 * self.attention_head_dim  # q, out, k, v, text k, v, norms
        per_block = d * 4 * d + 4 * d + self.joint_attention_dim * d + d + attn
        total = active = L * per_block
        for i in range(L):
            if i in self.moe_layers:
                experts, shared, gate = E * 3 * d * F, 3 * d * F, 2 * d * E
                total += experts + shared + gate
                active += shared + gate + round(experts * self.capacity_factors[i] / E)
            else:
                total += 3 * d * self.dense_mlp_dim
                active += 3 * d * self.dense_mlp_dim
        rest = (self.in_channels * d + d) + (d * 4 * d + 4 * d + 4 * d * d + d + d) + self.joint_attention_dim
        rest += 2 * d * d + 2 * d + d * self.patch_size**2 * self.out_channels
        return {"total": total + rest, "active_per_token": active + rest}

    # ---- (de)serialisation ---------------------------------------------------------------------------------
    def replace(self, **overrides) -> NucleusConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(
                f"unknown NucleusConfig fields {sorted(unknown)}; accepted: {[f.name for f in dataclasses.fields(self)]}"
            )
        if "num_layers" in overrides and "capacity_factors" not in overrides:
            # Keep the per-layer pattern meaningful when only the depth changes.
            n = overrides["num_layers"]
            moe_cf = max(self.capacity_factors) if any(self.capacity_factors) else 2.0
            overrides["capacity_factors"] = tuple(
                moe_cf if is_moe_layer(overrides.get("dense_moe_strategy", self.dense_moe_strategy), i, n) else 0.0
                for i in range(n)
            )
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        """The diffusers config.json content (our `router_input`, `router_type` and `router_top_k` only when they
        differ from the release's defaults, so a released-style config stays diffusers' own; `kernels`, a way of
        running the model, never)."""
        out: dict[str, Any] = {"_class_name": "NucleusMoEImageTransformer2DModel", "_diffusers_version": "0.38.0"}
        ours = {"router_input": "decoupled", "router_type": "expert_choice", "router_top_k": 2}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (f.name in ours and value == ours[f.name]) or f.name == "kernels":
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict) -> NucleusConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        # diffusers' defaults for keys a config.json may omit.
        kwargs.setdefault("out_channels", None)
        kwargs.setdefault("num_key_value_heads", None)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | Path) -> NucleusConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def preset(cls, name: str) -> NucleusConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; accepted: {', '.join(PRESETS)}")
        return PRESETS[name]()


def released() -> NucleusConfig:
    """The released NucleusAI/Nucleus-Image transformer: 32 blocks, 64 experts, 16.9B parameters."""
    return NucleusConfig()


def small() -> NucleusConfig:
    """A CPU-sized model with the release's structure (GQA, 3 dense blocks, per-layer CF): ~0.3B parameters."""
    return NucleusConfig(
        in_channels=64,
        out_channels=16,
        num_layers=8,
        attention_head_dim=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        joint_attention_dim=384,
        axes_dims_rope=(8, 28, 28),
        num_experts=16,
        moe_intermediate_dim=512,
        capacity_factors=(0.0,) * 3 + (4.0,) * 2 + (2.0,) * 3,
        dense_moe_strategy="leave_first_three_blocks_dense",
    )


def tiny() -> NucleusConfig:
    """The embedded default's model: trains on 2 CPU cores in minutes on the synthetic pixel domain
    (12 latent channels = 3 RGB x 2x2 space-to-depth, MiniLM text states of width 384)."""
    return NucleusConfig(
        in_channels=48,
        out_channels=12,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        joint_attention_dim=384,
        axes_dims_rope=(4, 14, 14),
        num_experts=8,
        moe_intermediate_dim=128,
        capacity_factors=(0.0, 4.0, 4.0, 2.0),
        dense_moe_strategy="leave_first_block_dense",
    )


PRESETS = {"released": released, "small": small, "tiny": tiny}
