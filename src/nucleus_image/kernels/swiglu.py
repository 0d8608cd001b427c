"""SwiGLU's gated activation on the fused projection: a Triton kernel (forward and backward) beside its PyTorch
reference, registered as a torch custom op.

    act_MF = torch.ops.nucleus.swiglu(h_M2F, gate_first)

`h` is the output of one projection to 2F features, laid out [gate | up] (gate_first, the routed experts'
gate_up_proj) or [value | gate] (diffusers' FeedForward, the shared expert and dense MLPs). The op returns
silu(gate) * up without splitting `h`: the two halves are strided views of it, which eager turns into three
elementwise passes (silu, product, and their backward's two more) and Liger's SiLUMul (an autograd.Function over two
separate contiguous tensors, not a custom op torch.compile can see) would first copy. The kernel reads each half
once and writes the F outputs; the backward recomputes the sigmoid and writes both halves' gradients into one
(..., 2F) tensor, the layout the projection's backward reads.

Numerics: fp32 inside, each output rounded once to the input dtype (eager rounds silu(gate) before the product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

BLOCK = 1024  # features per program


def swiglu_reference(h: torch.Tensor, gate_first: bool) -> torch.Tensor:
    """silu(gate) * up over h's two halves: [gate | up] when gate_first, else [value | gate]."""
    a, b = h.chunk(2, dim=-1)
    return F.silu(a) * b if gate_first else a * F.silu(b)


@triton.jit
def _swiglu_fwd(h_ptr, out_ptr, F_, GATE_FIRST: tl.constexpr, BLOCK_F: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F_
    first = tl.load(h_ptr + row * 2 * F_ + cols, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(h_ptr + row * 2 * F_ + F_ + cols, mask=mask, other=0.0).to(tl.float32)
    if GATE_FIRST:
        gate, up = first, second
    else:
        up, gate = first, second
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * F_ + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(h_ptr, dout_ptr, dh_ptr, F_, GATE_FIRST: tl.constexpr, BLOCK_F: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < F_
    first = tl.load(h_ptr + row * 2 * F_ + cols, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(h_ptr + row * 2 * F_ + F_ + cols, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + row * F_ + cols, mask=mask, other=0.0).to(tl.float32)
    if GATE_FIRST:
        gate, up = first, second
    else:
        up, gate = first, second
    sig = 1.0 / (1.0 + tl.exp(-gate))
    d_up = dout * gate * sig
    d_gate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    if GATE_FIRST:
        d_first, d_second = d_gate, d_up
    else:
        d_first, d_second = d_up, d_gate
    tl.store(dh_ptr + row * 2 * F_ + cols, d_first.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptr + row * 2 * F_ + F_ + cols, d_second.to(dh_ptr.dtype.element_ty), mask=mask)


def _grid(rows: int, features: int) -> tuple[int, int]:
    return rows, triton.cdiv(features, _block(features))


def _block(features: int) -> int:
    return min(BLOCK, triton.next_power_of_2(features))


@triton_op("nucleus::swiglu", mutates_args={})
def swiglu(h: torch.Tensor, gate_first: bool) -> torch.Tensor:
    """silu(gate) * up: see swiglu_reference."""
    if h.ndim < 1 or h.shape[-1] % 2:
        raise ValueError(f"swiglu's input has shape {tuple(h.shape)}; its last dimension must be even (2F features)")
    h = h.contiguous()
    F_ = h.shape[-1] // 2
    out = h.new_empty(*h.shape[:-1], F_)
    rows = h.numel() // (2 * F_) if F_ else 0
    if rows:
        wrap_triton(_swiglu_fwd)[_grid(rows, F_)](h, out, F_, GATE_FIRST=gate_first, BLOCK_F=_block(F_))
    return out


@triton_op("nucleus::swiglu_backward", mutates_args={})
def swiglu_backward(h: torch.Tensor, d_out: torch.Tensor, gate_first: bool) -> torch.Tensor:
    """d(h) of swiglu, both halves in h's layout."""
    h, d_out = h.contiguous(), d_out.contiguous()
    F_ = h.shape[-1] // 2
    dh = torch.empty_like(h)
    rows = h.numel() // (2 * F_) if F_ else 0
    if rows:
        wrap_triton(_swiglu_bwd)[_grid(rows, F_)](h, d_out, dh, F_, GATE_FIRST=gate_first, BLOCK_F=_block(F_))
    return dh


def _setup(ctx, inputs, output):
    h, gate_first = inputs
    ctx.save_for_backward(h)
    ctx.gate_first = gate_first


def _backward(ctx, d_out):
    (h,) = ctx.saved_tensors
    return swiglu_backward(h, d_out, ctx.gate_first), None


swiglu.register_autograd(_backward, setup_context=_setup)
