"""LayerNorm + adaptive modulation, and the gated residual add fused with the next one: Triton kernels (forward and
backward) beside their PyTorch references, registered as torch custom ops so autograd, torch.compile and FSDP2 see
one op each.

    mod_BSD, norm_BSD = torch.ops.nucleus.ln_modulate(x_BSD, scale_B1D, shift_B1D_or_None, 1e-6)
    x_BSD, norm_BSD, mod_BSD = torch.ops.nucleus.gated_residual_ln_modulate(x_BSD, y_BSD, gate_B1D, scale_B1D, None, 1e-6)

What they compute (the block's eager expressions, `nucleus_image.model.transformer`):
    norm = layer_norm(x)                       no affine, fp32 statistics, eps 1e-6
    mod  = norm * (1 + scale) + shift          shift optional (the blocks have none, the output norm has one)
    x'   = x + tanh(clamp(gate, -2, 2)) * y    then norm and mod of x'
scale, shift and gate are per sample, (B, 1, D), broadcast over the S tokens.

Numerics: the kernels load in the input dtype, compute everything in fp32 and round each output once. Eager rounds
every intermediate to the input dtype (the norm, 1 + scale, each product and sum), and the norm of x' reads x' as
rounded; the kernels read x' as rounded too (so `norm` is exactly the norm of the returned residual). In float32
the two agree to fp32 rounding; in bf16 to a few bf16 ulps. The backward recomputes the statistics from x (one
more read of a row instead of storing them) and reduces the per-sample gradients (scale, shift, gate) over S as
fp32 partial sums per block of rows, summed by torch: no host sync.

Import this module only where the kernels are used: `@triton.jit` reads TRITON_INTERPRET when it decorates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

ROWS_PER_PROGRAM = 16  # backward: tokens per program, whose per-sample gradient partials it sums in registers


# ---- references ------------------------------------------------------------------------------------------------
def ln_modulate_reference(
    x_BSD: torch.Tensor, scale_B1D: torch.Tensor, shift_B1D: torch.Tensor | None = None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm * (1 + scale) + shift, norm), norm = LayerNorm(x) without affine: the block's eager expression."""
    norm = F.layer_norm(x_BSD, (x_BSD.shape[-1],), eps=eps)
    mod = norm * (1 + scale_B1D)
    return (mod if shift_B1D is None else mod + shift_B1D), norm


def gated_residual_ln_modulate_reference(
    x_BSD: torch.Tensor,
    y_BSD: torch.Tensor,
    gate_B1D: torch.Tensor,
    scale_B1D: torch.Tensor,
    shift_B1D: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x', norm, mod) with x' = x + tanh(clamp(gate, -2, 2)) * y and (mod, norm) = ln_modulate(x')."""
    x_BSD = x_BSD + gate_B1D.clamp(-2.0, 2.0).tanh() * y_BSD
    mod, norm = ln_modulate_reference(x_BSD, scale_B1D, shift_B1D, eps)
    return x_BSD, norm, mod


# ---- kernels -----------------------------------------------------------------------------------------------------
@triton.jit
def _tanh(v):
    return 2.0 / (1.0 + tl.exp(-2.0 * v)) - 1.0


@triton.jit
def _norm_mod_fwd(
    x_ptr,
    y_ptr,
    gate_ptr,
    scale_ptr,
    shift_ptr,
    res_ptr,
    norm_ptr,
    mod_ptr,
    S,
    D,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per token: [x' = x + tanh(clamp(gate)) * y,] norm = LN(x'), mod = norm * (1 + scale) [+ shift]."""
    row = tl.program_id(0).to(tl.int64)
    b = row // S
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y = tl.load(y_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
        x = x + _tanh(tl.minimum(tl.maximum(g, -2.0), 2.0)) * y
        res = x.to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * D + cols, res, mask=mask)
        x = res.to(tl.float32)  # the norm reads the residual as stored, as eager does
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
    n = xc * rstd
    tl.store(norm_ptr + row * D + cols, n.to(norm_ptr.dtype.element_ty), mask=mask)
    s = tl.load(scale_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    m = n * (1.0 + s)
    if HAS_SHIFT:
        m = m + tl.load(shift_ptr + b * D + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(mod_ptr + row * D + cols, m.to(mod_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_mod_bwd(
    x_ptr,
    y_ptr,
    gate_ptr,
    scale_ptr,
    dres_ptr,
    dnorm_ptr,
    dmod_ptr,
    dx_ptr,
    dy_ptr,
    dscale_part_ptr,
    dshift_part_ptr,
    dgate_part_ptr,
    S,
    D,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DNORM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per ROWS tokens of one sample. x_ptr holds the tensor that was normalised (x' when HAS_RESIDUAL).
    Writes dx (and dy), and this block's fp32 partial sums over its tokens of d(scale), d(shift) (and
    d(x') * y, which times the tanh/clamp derivative is d(gate))."""
    b = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    n_chunks = tl.num_programs(1)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    s = tl.load(scale_ptr + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        g = tl.load(gate_ptr + b * D + cols, mask=cmask, other=0.0).to(tl.float32)
        tg = _tanh(tl.minimum(tl.maximum(g, -2.0), 2.0))
    dscale = tl.zeros([BLOCK_D], dtype=tl.float32)
    dshift = tl.zeros([BLOCK_D], dtype=tl.float32)
    dgate = tl.zeros([BLOCK_D], dtype=tl.float32)
    for i in range(ROWS):
        t = chunk * ROWS + i
        mask = cmask & ((cols * 0 + t) < S)  # a block of tokens may run past the sample's last
        offs = (b * S + t) * D + cols
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / D + eps)
        n = xc * rstd
        dm = tl.load(dmod_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dscale += dm * n
        dshift += dm
        dn = dm * (1.0 + s)
        if HAS_DNORM:
            dn += tl.load(dnorm_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx = rstd * (dn - tl.sum(dn, axis=0) / D - n * (tl.sum(dn * n, axis=0) / D))
        if HAS_RESIDUAL:
            dx += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dgate += dx * y
            tl.store(dy_ptr + offs, (dx * tg).to(dy_ptr.dtype.element_ty), mask=mask)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    part = (b * n_chunks + chunk) * D + cols
    tl.store(dscale_part_ptr + part, dscale, mask=cmask)
    tl.store(dshift_part_ptr + part, dshift, mask=cmask)
    if HAS_RESIDUAL:
        tl.store(dgate_part_ptr + part, dgate, mask=cmask)


def _block_d(D: int) -> int:
    return triton.next_power_of_2(D)


def _num_warps(D: int) -> int:
    return min(max(_block_d(D) // 256, 1), 8)


def _check(x_BSD: torch.Tensor, *per_sample: torch.Tensor | None) -> None:
    if x_BSD.ndim != 3:
        raise ValueError(f"x has shape {tuple(x_BSD.shape)}; expected (batch, tokens, dim)")
    B, _, D = x_BSD.shape
    for t in per_sample:
        if t is not None and tuple(t.shape) != (B, 1, D):
            raise ValueError(
                f"a per-sample modulation has shape {tuple(t.shape)}; expected (batch, 1, dim) = {(B, 1, D)}"
            )


# ---- forward ops -------------------------------------------------------------------------------------------------
def _forward(x, y, gate, scale, shift, eps):
    B, S, D = x.shape
    has_residual = y is not None
    res = torch.empty_like(x) if has_residual else x
    norm = torch.empty_like(x)
    mod = torch.empty_like(x)
    wrap_triton(_norm_mod_fwd)[(B * S,)](
        x,
        y if has_residual else x,
        gate if has_residual else scale,
        scale,
        shift if shift is not None else scale,
        res,
        norm,
        mod,
        S,
        D,
        eps,
        HAS_RESIDUAL=has_residual,
        HAS_SHIFT=shift is not None,
        BLOCK_D=_block_d(D),
        num_warps=_num_warps(D),
    )
    return res, norm, mod


@triton_op("nucleus::ln_modulate", mutates_args={})
def ln_modulate(
    x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mod, norm): see ln_modulate_reference."""
    _check(x, scale, shift)
    x, scale = x.contiguous(), scale.contiguous()
    shift = shift.contiguous() if shift is not None else None
    _, norm, mod = _forward(x, None, None, scale, shift, eps)
    return mod, norm


@triton_op("nucleus::gated_residual_ln_modulate", mutates_args={})
def gated_residual_ln_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x', norm, mod): see gated_residual_ln_modulate_reference."""
    _check(x, gate, scale, shift)
    if y.shape != x.shape:
        raise ValueError(f"the residual branch y has shape {tuple(y.shape)}; expected x's {tuple(x.shape)}")
    x, y, gate, scale = x.contiguous(), y.contiguous(), gate.contiguous(), scale.contiguous()
    shift = shift.contiguous() if shift is not None else None
    return _forward(x, y, gate, scale, shift, eps)


# ---- backward op -------------------------------------------------------------------------------------------------
@triton_op("nucleus::norm_modulate_backward", mutates_args={})
def norm_modulate_backward(
    normed_input: torch.Tensor,
    y: torch.Tensor | None,
    gate: torch.Tensor | None,
    scale: torch.Tensor,
    d_res: torch.Tensor | None,
    d_norm: torch.Tensor | None,
    d_mod: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, d_scale, d_shift, d_gate) of both forward ops; `normed_input` is the tensor that was normalised
    (x, or x' with the residual). Without the residual dy and d_gate come back empty."""
    B, S, D = normed_input.shape
    has_residual = y is not None
    # The saved inputs are the caller's tensors: per-sample chunks of one projection are strided views.
    normed_input, scale, d_mod = normed_input.contiguous(), scale.contiguous(), d_mod.contiguous()
    y = y.contiguous() if y is not None else None
    gate = gate.contiguous() if gate is not None else None
    d_norm = d_norm.contiguous() if d_norm is not None else None
    if has_residual:
        d_res = (d_res if d_res is not None else torch.zeros_like(normed_input)).contiguous()
    n_chunks = triton.cdiv(S, ROWS_PER_PROGRAM)
    dx = torch.empty_like(normed_input)
    dy = torch.empty_like(y) if y is not None else normed_input.new_empty(0)
    part = lambda: torch.empty(B, n_chunks, D, dtype=torch.float32, device=normed_input.device)  # noqa: E731
    dscale_part, dshift_part = part(), part()
    dgate_part = part() if has_residual else dscale_part
    wrap_triton(_norm_mod_bwd)[(B, n_chunks)](
        normed_input,
        y if has_residual else normed_input,
        gate if has_residual else scale,
        scale,
        d_res if has_residual else d_mod,
        d_norm if d_norm is not None else d_mod,
        d_mod,
        dx,
        dy if has_residual else dx,
        dscale_part,
        dshift_part,
        dgate_part,
        S,
        D,
        eps,
        HAS_RESIDUAL=has_residual,
        HAS_DNORM=d_norm is not None,
        ROWS=ROWS_PER_PROGRAM,
        BLOCK_D=_block_d(D),
        num_warps=_num_warps(D),
    )
    d_scale = dscale_part.sum(1, keepdim=True).to(scale.dtype)
    d_shift = dshift_part.sum(1, keepdim=True).to(scale.dtype)
    if has_residual:
        assert gate is not None
        g = gate.float()
        d_gate = dgate_part.sum(1, keepdim=True) * (1 - g.clamp(-2.0, 2.0).tanh() ** 2) * ((g >= -2) & (g <= 2))
        d_gate = d_gate.to(gate.dtype)
    else:
        d_gate = scale.new_empty(0)
    return dx, dy, d_scale, d_shift, d_gate


# ---- autograd ----------------------------------------------------------------------------------------------------
def _ln_modulate_setup(ctx, inputs, output):
    x, scale, shift, eps = inputs
    ctx.save_for_backward(x, scale)
    ctx.shift_dtype, ctx.eps = shift.dtype if shift is not None else None, eps


def _ln_modulate_backward(ctx, d_mod, d_norm):
    x, scale = ctx.saved_tensors
    d_mod = d_mod if d_mod is not None else torch.zeros_like(x)  # an unused output may bring no gradient
    dx, _, d_scale, d_shift, _ = norm_modulate_backward(x, None, None, scale, None, d_norm, d_mod, ctx.eps)
    return dx, d_scale, d_shift.to(ctx.shift_dtype) if ctx.shift_dtype else None, None


def _gated_setup(ctx, inputs, output):
    _, y, gate, scale, shift, eps = inputs
    ctx.save_for_backward(output[0], y, gate, scale)
    ctx.shift_dtype, ctx.eps = shift.dtype if shift is not None else None, eps


def _gated_backward(ctx, d_res, d_norm, d_mod):
    res, y, gate, scale = ctx.saved_tensors
    d_mod = d_mod if d_mod is not None else torch.zeros_like(res)
    dx, dy, d_scale, d_shift, d_gate = norm_modulate_backward(res, y, gate, scale, d_res, d_norm, d_mod, ctx.eps)
    return dx, dy, d_gate, d_scale, d_shift.to(ctx.shift_dtype) if ctx.shift_dtype else None, None


ln_modulate.register_autograd(_ln_modulate_backward, setup_context=_ln_modulate_setup)
gated_residual_ln_modulate.register_autograd(_gated_backward, setup_context=_gated_setup)
