"""Parameter counts of a Nucleus transformer by role, from a model built on the meta device (no memory used):
routed experts vs everything else, Muon vs AdamW (the trainer's own split), and the largest block."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..model import NucleusConfig, NucleusTransformer


@dataclass(frozen=True)
class ParamCounts:
    total: int
    experts: int  # routed experts (mlp.experts.*): what expert parallelism splits
    muon: int
    adamw: int
    muon_experts: int
    largest_block: int  # one block's parameters, experts included
    largest_block_experts: int
    largest_muon_matrix: int  # elements of the largest matrix Muon orthogonalises (one expert's, for experts)
    quantizable: int  # elements of the weights 8-bit quantization converts (`quantization_targets`): 1 byte each
    quant_scales: int  # one scale per output column (and per expert for expert tensors)
    largest_quantizable: int  # the biggest single quantized weight tensor (dequantized transiently in bf16)
    muon_shapes: tuple[tuple[bool, tuple[int, ...]], ...]  # (routed expert?, shape) of every Muon tensor, in order


def meta_model(config: NucleusConfig) -> NucleusTransformer:
    with torch.device("meta"):
        return NucleusTransformer(config)


def is_expert(name: str) -> bool:
    return ".experts." in name


@lru_cache(maxsize=16)
def count_params(config: NucleusConfig) -> ParamCounts:
    from ..quantization.apply import quantization_targets
    from ..training.optim import split_params

    model = meta_model(config)
    groups = split_params(model)
    muon = sum(p.numel() for _, p in groups["muon"])
    adamw = sum(p.numel() for _, p in groups["adamw"])
    muon_experts = sum(p.numel() for n, p in groups["muon"] if is_expert(n))
    largest_muon = (
        max((p[0].numel() if is_expert(n) else p.numel()) for n, p in groups["muon"]) if groups["muon"] else 0
    )
    blocks = [
        (sum(p.numel() for p in b.parameters()), sum(p.numel() for n, p in b.named_parameters() if is_expert(n)))
        for b in model.transformer_blocks
    ]
    block, block_experts = max(blocks)
    # The router gates, img_in and proj_out stay in the model's dtype (quantization.apply.keeps_precision).
    weights = [p for _, module in quantization_targets(model) for p in module.parameters(recurse=False) if p.ndim >= 2]
    scales = sum(p.shape[0] * p.shape[-1] if p.ndim == 3 else p.shape[0] for p in weights)
    return ParamCounts(
        total=sum(p.numel() for p in model.parameters()),
        experts=sum(p.numel() for n, p in model.named_parameters() if is_expert(n)),
        muon=muon,
        adamw=adamw,
        muon_experts=muon_experts,
        largest_block=block,
        largest_block_experts=block_experts,
        largest_muon_matrix=largest_muon,
        quantizable=sum(p.numel() for p in weights),
        quant_scales=scales,
        largest_quantizable=max(p.numel() for p in weights),
        muon_shapes=tuple((is_expert(n), tuple(p.shape)) for n, p in groups["muon"]),
    )


def latent_tokens(config: NucleusConfig, height: int, width: int, vae_factor: int = 8) -> tuple[int, int]:
    """(h, w) of the packed token grid for an image size: pixels / (autoencoder factor x patch size)."""
    g = vae_factor * config.patch_size
    if height % g or width % g:
        raise ValueError(
            f"image size {width}x{height} must be a multiple of {g} (autoencoder factor {vae_factor} x "
            f"patch size {config.patch_size})"
        )
    return height // g, width // g


def forward_inputs(config: NucleusConfig, batch: int, grid: tuple[int, int], text_tokens: int, device, dtype) -> dict:
    h, w = grid
    return dict(
        hidden_states=torch.zeros(batch, h * w, config.in_channels, device=device, dtype=dtype),
        img_shapes=[(1, h, w)] * batch,
        encoder_hidden_states=torch.zeros(batch, text_tokens, config.joint_attention_dim, device=device, dtype=dtype),
        encoder_hidden_states_mask=None,
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
    )
