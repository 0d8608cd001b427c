"""The Nucleus MoE diffusion transformer: single-stream DiT blocks over image tokens, text as keys/values only.

Numerically identical to diffusers' `NucleusMoEImageTransformer2DModel` (same state-dict keys, same forward
keywords), plus: text keys/values computed once per prompt set (`encode_text` -> `text_kv=`), batched-matmul
experts with static shapes, routing outputs on request, per-stage capacity factors, gradient checkpointing.

    model = NucleusTransformer(NucleusConfig.preset("tiny"))
    out = model(hidden_states=x_BSC, img_shapes=[(1, h, w)] * B, encoder_hidden_states=txt_BLD, timestep=t_B).sample
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nucleus_image.kernels.runtime import check_can_run

from .attention import Attention
from .config import NucleusConfig
from .fused import fused_ops
from .mlp import SwiGLU
from .moe import MoELayer, Routing, SwiGLUExperts
from .norms import RMSNorm, layer_norm
from .rope import image_angles, rotations, text_angles


@dataclass
class TextKV:
    """Per-block text keys and values, (B, kv_heads, L, head_dim) each, with RoPE applied for an image grid
    whose half-extent is `text_offset` = max(h//2, w//2). Valid for any image of the same offset."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    mask_BL: torch.Tensor | None
    text_offset: int

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]


@dataclass
class NucleusTransformerOutput:
    sample: torch.Tensor
    router_logits: tuple[torch.Tensor, ...] | None = None
    expert_indices: tuple[torch.Tensor, ...] | None = None

    def __getitem__(self, i):
        return (self.sample, self.router_logits, self.expert_indices)[i] if isinstance(i, int) else getattr(self, i)


def timestep_features(t_B: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t*1000, [cos | sin] (diffusers' Timesteps with flip_sin_to_cos=True)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t_B.device) / half
    args = 1000 * (t_B[:, None].float() * torch.exp(exponent)[None])  # the reference's rounding order
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, 4 * dim)
        self.linear_2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.timestep_embedder = _TimestepEmbedder(dim)
        self.norm = RMSNorm(dim)

    def forward(self, t_B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.norm(self.timestep_embedder(timestep_features(t_B, self.dim).to(dtype)))


class OutputNorm(nn.Module):
    """Final adaptive LayerNorm: scale and shift from the timestep embedding (this one does shift)."""

    def __init__(self, dim: int, kernels: str = "eager"):
        super().__init__()
        self.kernels = kernels
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x_BSD: torch.Tensor, temb_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(temb_BD).to(x_BSD.dtype)).chunk(2, dim=1)
        if self.kernels == "triton":
            return fused_ops(x_BSD.device).ln_modulate(x_BSD, scale[:, None], shift[:, None], 1e-6)[0]
        return layer_norm(x_BSD) * (1 + scale)[:, None] + shift[:, None]


class NucleusBlock(nn.Module):
    def __init__(self, cfg: NucleusConfig, layer_idx: int):
        super().__init__()
        d = cfg.hidden_size
        self.coupled = cfg.router_input == "coupled"
        self.kernels = cfg.kernels
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(d, 4 * d))
        self.encoder_proj = nn.Linear(cfg.joint_attention_dim, d)
        self.attn = Attention(d, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attention_head_dim)
        self.is_moe = layer_idx in cfg.moe_layers
        self.img_mlp: MoELayer | SwiGLU
        if self.is_moe:
            self.img_mlp = MoELayer(
                d,
                cfg.moe_intermediate_dim,
                cfg.num_experts,
                cfg.capacity_factors[layer_idx],
                cfg.use_sigmoid,
                cfg.route_scale,
                kernels=cfg.kernels,
                router_type=cfg.router_type,
                top_k=cfg.router_top_k,
            )
        else:
            self.img_mlp = SwiGLU(d, cfg.dense_mlp_dim, kernels=cfg.kernels)

    def text_kv(self, txt_normed_BLJ, txt_rot):
        return self.attn.text_kv(self.encoder_proj(txt_normed_BLJ), txt_rot)

    def forward(self, x, temb, img_rot, txt_k, txt_v, mask) -> tuple[torch.Tensor, Routing | None]:
        scale1, gate1, scale2, gate2 = self.img_mod(temb).unsqueeze(1).chunk(4, dim=-1)
        if self.kernels == "triton":
            ops = fused_ops(x.device)
            attn_out = self.attn(ops.ln_modulate(x, scale1, None, 1e-6)[0], img_rot, txt_k, txt_v, mask)
            x, normed, x_mod = ops.gated_residual_ln_modulate(x, attn_out, gate1, scale2, None, 1e-6)
        else:
            x = x + gate1.clamp(-2.0, 2.0).tanh() * self.attn(layer_norm(x) * (1 + scale1), img_rot, txt_k, txt_v, mask)
            normed = layer_norm(x)
            x_mod = normed * (1 + scale2)
        routing = None
        if self.is_moe:
            mlp_out, routing = self.img_mlp(x_mod, x_mod if self.coupled else normed, temb)
        else:
            mlp_out = self.img_mlp(x_mod)
        x = x + gate2.clamp(-2.0, 2.0).tanh() * mlp_out
        if x.dtype == torch.float16:
            x = x.clip(torch.finfo(torch.float16).min, torch.finfo(torch.float16).max)
        return x, routing


class NucleusTransformer(nn.Module):
    is_cache_enabled = False  # diffusers' pipeline asks; our text K/V reuse is explicit (`text_kv=`), not a hook.
    quantization: str | None = None  # "int8" | "fp8" once quantized (see nucleus_image.quantization)

    def __init__(self, config: NucleusConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.time_text_embed = TimeEmbedding(d)
        self.txt_norm = RMSNorm(config.joint_attention_dim)
        self.img_in = nn.Linear(config.in_channels, d)
        self.transformer_blocks = nn.ModuleList([NucleusBlock(config, i) for i in range(config.num_layers)])
        self.norm_out = OutputNorm(d, config.kernels)
        self.proj_out = nn.Linear(d, config.patch_size**2 * config.out_channels, bias=False)
        self.gradient_checkpointing = False
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ---- construction ----------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Training-from-scratch init: xavier linears, scaled-normal experts, and adaLN-Zero (modulation,
        output norm and head at zero, so every block starts as the identity and the output as zero)."""
        for p in self.parameters():
            if p.ndim == 3:  # stacked experts (E, in, out)
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=generator)
            elif p.ndim == 2:
                bound = math.sqrt(6.0 / (p.shape[0] + p.shape[1]))
                p.uniform_(-bound, bound, generator=generator)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.zero_()
        for blk in self.blocks():
            cast(nn.Linear, blk.img_mod[1]).weight.zero_()
            if isinstance(blk.img_mlp, MoELayer):
                blk.img_mlp.gate.weight.normal_(0.0, 0.02, generator=generator)
        self.norm_out.linear.weight.zero_()
        self.proj_out.weight.zero_()

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu", subfolder: str | None = None):
        """A diffusers transformer folder (or a pipeline folder's transformer/, or a Hub id). 8-bit folders and
        quantizing while loading are `nucleus_image.quantization.load_transformer`'s (applied from outside)."""
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, subfolder=subfolder)

    def save_pretrained(self, path, max_shard_size: int | str = "10GB") -> None:
        from .checkpoint import save_pretrained

        if self.quantization is not None:
            raise ValueError(
                f"this transformer holds {self.quantization} weights; save it with "
                f"nucleus_image.quantization.save_transformer(model, path) (or the pipeline's "
                f"save_pretrained), which writes the quantized layout"
            )
        save_pretrained(self, path, max_shard_size=max_shard_size)

    def blocks(self) -> list[NucleusBlock]:
        """`transformer_blocks` as the NucleusBlocks they are (an nn.ModuleList hands a type checker plain Modules)."""
        return [cast(NucleusBlock, blk) for blk in self.transformer_blocks]

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.weight.device

    def set_kernels(self, kernels: str) -> None:
        """Run the blocks on "eager" PyTorch ops or the fused "triton" kernels (same weights, same results within
        rounding); refused where Triton cannot run on the model's device."""
        check_can_run(kernels, self.device)
        self.config = self.config.replace(kernels=kernels)
        for m in self.modules():
            if isinstance(m, (NucleusBlock, OutputNorm, MoELayer, SwiGLU, SwiGLUExperts)):
                m.kernels = kernels

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def set_capacity_factors(self, capacity_factors) -> None:
        """Change per-layer capacity factors (the training curriculum does this per stage)."""
        self.config = self.config.replace(capacity_factors=tuple(capacity_factors))
        for i, blk in enumerate(self.blocks()):
            if isinstance(blk.img_mlp, MoELayer):
                blk.img_mlp.capacity_factor = self.config.capacity_factors[i]

    # ---- text work, once per prompt set ------------------------------------------------------------------
    def encode_text(
        self,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        img_shapes=None,
    ) -> TextKV:
        """Per-block text keys/values for an image grid: compute once per prompt set, reuse on every step."""
        if img_shapes is None:
            raise ValueError("encode_text needs img_shapes (text RoPE positions start after the image grid)")
        _, h, w = _grid(img_shapes)
        cfg = self.config
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != cfg.joint_attention_dim:
            raise ValueError(
                f"encoder_hidden_states has shape {tuple(encoder_hidden_states.shape)}; expected (batch, text_len, "
                f"{cfg.joint_attention_dim})"
            )
        B, L, _ = encoder_hidden_states.shape
        mask = None
        if encoder_hidden_states_mask is not None:
            if tuple(encoder_hidden_states_mask.shape) != (B, L):
                raise ValueError(
                    f"encoder_hidden_states_mask has shape {tuple(encoder_hidden_states_mask.shape)}; expected "
                    f"(batch, text_len) = ({B}, {L})"
                )
            mask = encoder_hidden_states_mask.to(torch.bool)
        rot = rotations(text_angles(L, h, w, cfg.axes_dims_rope, device=encoder_hidden_states.device))
        txt = self.txt_norm(encoder_hidden_states.to(self.dtype))
        kv = [blk.text_kv(txt, rot) for blk in self.blocks()]
        return TextKV(tuple(k for k, _ in kv), tuple(v for _, v in kv), mask, max(h // 2, w // 2))

    # ---- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        img_shapes=None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_hidden_states_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        attention_kwargs: dict | None = None,
        return_dict: bool = True,
        text_kv: TextKV | None = None,
        return_routing: bool = False,
        block_stack=None,
    ):
        """`block_stack`, for inference-time step caches (nucleus_image.pipeline.step_cache): a callable that
        replaces the loop over blocks, called as `block_stack(blocks, x_BSD, temb_BD, img_rot, text_kv, mask)` and
        returning the stack's output; each block is called as `block(x, temb, img_rot, k, v, mask)`."""
        cfg = self.config
        if block_stack is not None and (return_routing or torch.is_grad_enabled()):
            raise ValueError("block_stack (a step cache) is for inference only: not with return_routing or autograd")
        if attention_kwargs and set(attention_kwargs) - {"scale"} or (attention_kwargs or {}).get("scale", 1.0) != 1.0:
            raise ValueError(f"attention_kwargs {attention_kwargs} not supported; accepted: None or {{'scale': 1.0}}")
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states has shape {tuple(hidden_states.shape)}; expected (batch, image_tokens, "
                f"in_channels={cfg.in_channels}) packed latents"
            )
        B, S, _ = hidden_states.shape
        if img_shapes is None:
            raise ValueError("img_shapes is required: [(frames, height, width)] per sample, in patches")
        f, h, w = _grid(img_shapes)
        if f * h * w != S:
            raise ValueError(f"img_shapes {(f, h, w)} gives {f * h * w} tokens but hidden_states has {S} image tokens")
        if timestep is None:
            raise ValueError("timestep is required: a (batch,) tensor of sigmas in [0, 1]")
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        if timestep.shape != (B,):
            raise ValueError(f"timestep has shape {tuple(timestep.shape)}; expected ({B},) or a scalar")
        if text_kv is None:
            if encoder_hidden_states is None:
                raise ValueError("pass encoder_hidden_states (and optionally its mask) or a precomputed text_kv")
            if encoder_hidden_states.shape[0] != B:
                raise ValueError(
                    f"encoder_hidden_states batch {encoder_hidden_states.shape[0]} != hidden_states batch {B}"
                )
            text_kv = self.encode_text(encoder_hidden_states, encoder_hidden_states_mask, [(f, h, w)])
        elif text_kv.batch_size != B or text_kv.text_offset != max(h // 2, w // 2):
            raise ValueError(
                f"text_kv was computed for batch {text_kv.batch_size} and text offset {text_kv.text_offset}; this call "
                f"has batch {B} and grid {h}x{w} (offset {max(h // 2, w // 2)}): recompute it with encode_text"
            )

        x = self.img_in(hidden_states)
        temb = self.time_text_embed(timestep.to(x.dtype), x.dtype)
        img_rot = rotations(image_angles(f, h, w, cfg.axes_dims_rope, device=x.device))
        mask = None
        if text_kv.mask_BL is not None:
            image_part = torch.ones(B, S, dtype=torch.bool, device=x.device)
            mask = torch.cat([image_part, text_kv.mask_BL], dim=1)[:, None, None, :]

        logits, indices = [], []
        if block_stack is not None:
            x = block_stack(self.transformer_blocks, x, temb, img_rot, text_kv, mask)
        else:
            for blk, k, v in zip(self.transformer_blocks, text_kv.keys, text_kv.values):
                if self.gradient_checkpointing and torch.is_grad_enabled():
                    x, routing = checkpoint(blk, x, temb, img_rot, k, v, mask, use_reentrant=False)
                else:
                    x, routing = blk(x, temb, img_rot, k, v, mask)
                if routing is not None and return_routing:
                    logits.append(routing.logits_BSE)
                    indices.append(routing.indices_BEC)

        sample = self.proj_out(self.norm_out(x, temb))
        routing_out = (tuple(logits), tuple(indices)) if return_routing else (None, None)
        if not return_dict:
            return (sample, *routing_out) if return_routing else (sample,)
        return NucleusTransformerOutput(sample, *routing_out)


def _grid(img_shapes) -> tuple[int, int, int]:
    """One (frames, height, width) for the batch: static shapes need every sample on the same grid."""
    expected = f"img_shapes {img_shapes!r} must be (frames, height, width) or a list of them, positive ints in patches"
    if isinstance(img_shapes, (tuple, list)) and len(img_shapes) == 3 and all(isinstance(v, int) for v in img_shapes):
        img_shapes_list = [img_shapes]
    elif isinstance(img_shapes, (tuple, list)):
        img_shapes_list = list(img_shapes)
    else:
        raise ValueError(expected)
    if not img_shapes_list or any(not isinstance(s, (tuple, list)) or len(s) != 3 for s in img_shapes_list):
        raise ValueError(expected)
    try:
        shapes = [(operator.index(s[0]), operator.index(s[1]), operator.index(s[2])) for s in img_shapes_list]
    except TypeError:
        raise ValueError(expected) from None
    if any(v < 1 for s in shapes for v in s):
        raise ValueError(expected)
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"img_shapes {img_shapes!r} mixes grids; a batch must share one (frames, height, width)")
    return shapes[0]
