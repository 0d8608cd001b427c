"""Activation memory of the transformer from shapes: the real forward (and backward) run on the meta device under
`LiveBytes`, so the figures follow the code as written (attention, expert gather/scatter, checkpointing) rather
than a hand formula that would drift from it. Activations scale linearly with the batch, so one sample is run
and multiplied."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..model import NucleusConfig
from .measure import LiveBytes
from .shapes import forward_inputs, meta_model


@dataclass(frozen=True)
class ActivationBytes:
    held: int  # saved for backward at the end of the forward (training) / 0 for inference
    peak: int  # most bytes live at once over forward (+ backward), weights and gradients excluded


@lru_cache(maxsize=64)
def training_activations(
    config: NucleusConfig,
    grid: tuple[int, int],
    text_tokens: int,
    checkpointing: bool,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "meta",
) -> ActivationBytes:
    """One sample's forward + backward. Each parameter's gradient is dropped as soon as it is accumulated, as
    FSDP does after its reduce-scatter, so what remains is activations and transient buffers."""
    model = _model(config, dtype, device)
    model.train().enable_gradient_checkpointing(checkpointing)
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(_drop_grad)
    kw = forward_inputs(config, 1, grid, text_tokens, device, dtype)
    kw["hidden_states"].requires_grad_(True)
    with _flash_attention_shapes(device), LiveBytes() as live:
        out = model(**kw).sample
        held = live.live
        out.float().square().mean().backward()
    return ActivationBytes(held=held, peak=live.peak)


@lru_cache(maxsize=64)
def inference_activations(
    config: NucleusConfig,
    batch: int,
    grid: tuple[int, int],
    text_tokens: int,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "meta",
) -> ActivationBytes:
    model = _model(config, dtype, device).eval()
    kw = forward_inputs(config, batch, grid, text_tokens, device, dtype)
    with torch.no_grad(), _flash_attention_shapes(device), LiveBytes() as live:
        model(**kw)
    return ActivationBytes(held=0, peak=live.peak)


def _model(config: NucleusConfig, dtype: torch.dtype, device: str):
    if device == "meta":
        return meta_model(config).to(dtype)
    torch.manual_seed(0)
    from ..model import NucleusTransformer

    return NucleusTransformer(config).to(device=device, dtype=dtype)


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


class _FlashShapes(torch.autograd.Function):
    """What a fused (flash / cuDNN) attention kernel allocates: the output, and for backward q, k, v, the output
    and one fp32 log-sum-exp per query; never the S x S score matrix."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextmanager
def _flash_attention_shapes(device: str):
    """On the meta device only: the meta backend has no fused attention and would size the math fallback's
    score matrix, which a GPU run with flash / cuDNN attention never holds."""
    if device != "meta":
        yield
        return
    real = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda q, k, v, *a, **kw: _FlashShapes.apply(q, k, v)
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = real
