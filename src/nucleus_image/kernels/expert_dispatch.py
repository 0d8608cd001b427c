"""The expert-choice token permutation on the device: the gather of the chosen tokens into the experts' order, and
the weighted scatter-add of the experts' outputs back onto the tokens, as Triton kernels (forward and backward)
beside their PyTorch references, registered as torch custom ops.

    plan = dispatch_plan(idx_P, num_tokens)                                 # once per layer and batch
    rows_PD = torch.ops.nucleus.expert_gather(x_ND, idx_P, *plan)           # x[idx]
    out_ND  = torch.ops.nucleus.expert_combine(base_ND, rows_PD, w_P, idx_P, *plan)   # base + sum_p w_p rows_p at idx_p

`idx` holds, for each of the P = E * B * C picks in the experts' order, the flat token it took. A token may be
picked by several experts (expert choice) or by none. Both directions are written as gathers, so nothing is
summed by atomics and every sum runs in one fixed order (the picks' order), run to run and on any device:
- `dispatch_plan` sorts the picks by token (stable: a token's picks stay in the experts' order) and finds each
  token's run of picks with searchsorted: (order_P, offsets_N+1), static shapes, no host sync.
- gather: one program per pick copies its token's row; its backward sums a token's picks' gradients (a segment
  sum over the plan).
- combine: one program per token adds its picks' weighted rows to `base` (the shared expert's output) in fp32 and
  rounds once; its backward gathers d_out per pick, times the weight, and dots it with the pick's row for d(weight).
Eager's scatter_add sums in the same order (CPU), so float32 agrees to rounding; bf16 to a few bf16 ulps (eager
rounds each weighted row and each partial sum to bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton


# ---- references ------------------------------------------------------------------------------------------------
def expert_gather_reference(x_ND: torch.Tensor, idx_P: torch.Tensor) -> torch.Tensor:
    return x_ND.index_select(0, idx_P)


def expert_combine_reference(
    base_ND: torch.Tensor | None, rows_PD: torch.Tensor, weight_P: torch.Tensor | None, idx_P: torch.Tensor, num_tokens
) -> torch.Tensor:
    """base + sum over picks p of weight_p * rows_p at token idx_p (weighted in fp32, as the MoE layer does)."""
    if weight_P is not None:
        rows_PD = (rows_PD.float() * weight_P.float().unsqueeze(-1)).to(rows_PD.dtype)
    if base_ND is None:
        base_ND = rows_PD.new_zeros(num_tokens, rows_PD.shape[-1])
    return base_ND.scatter_add(0, idx_P.unsqueeze(-1).expand(-1, rows_PD.shape[-1]), rows_PD)


def dispatch_plan(idx_P: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): picks sorted by token, stably; token t's picks are order[offsets[t]:offsets[t + 1]]."""
    sorted_idx, order = torch.sort(idx_P, stable=True)
    targets = torch.arange(num_tokens + 1, device=idx_P.device, dtype=sorted_idx.dtype)
    return order, torch.searchsorted(sorted_idx, targets)


# ---- kernels -----------------------------------------------------------------------------------------------------
@triton.jit
def _gather_rows(
    src_ptr,
    idx_ptr,
    weight_ptr,
    dot_ptr,
    out_ptr,
    dot_out_ptr,
    D,
    HAS_WEIGHT: tl.constexpr,
    HAS_DOT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per pick p: out[p] = [weight[p] *] src[idx[p]] [, dot_out[p] = sum(src[idx[p]] * dot[p])]."""
    p = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    token = tl.load(idx_ptr + p).to(tl.int64)
    v = tl.load(src_ptr + token * D + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DOT:
        r = tl.load(dot_ptr + p * D + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dot_out_ptr + p, tl.sum(v * r, axis=0))
    if HAS_WEIGHT:
        v = v * tl.load(weight_ptr + p).to(tl.float32)
    tl.store(out_ptr + p * D + cols, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_sum(
    base_ptr,
    rows_ptr,
    weight_ptr,
    order_ptr,
    offsets_ptr,
    out_ptr,
    D,
    HAS_BASE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per token t: out[t] = [base[t] +] sum over its picks p, in order, of [weight[p] *] rows[p]."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    if HAS_BASE:
        acc = tl.load(base_ptr + t * D + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = tl.load(offsets_ptr + t)
    end = tl.load(offsets_ptr + t + 1)
    for j in range(start, end):
        p = tl.load(order_ptr + j).to(tl.int64)
        r = tl.load(rows_ptr + p * D + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            r = r * tl.load(weight_ptr + p).to(tl.float32)
        acc += r
    tl.store(out_ptr + t * D + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _block_d(D: int) -> int:
    return triton.next_power_of_2(max(D, 1))


def _num_warps(D: int) -> int:
    return min(max(_block_d(D) // 256, 1), 8)


def _check(idx: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, num_tokens: int) -> None:
    if idx.ndim != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"the pick indices have shape {tuple(idx.shape)} and dtype {idx.dtype}; expected 1-d integers")
    if order.shape != idx.shape or offsets.shape != (num_tokens + 1,):
        raise ValueError(
            f"the dispatch plan has order {tuple(order.shape)} and offsets {tuple(offsets.shape)}; expected "
            f"{tuple(idx.shape)} and ({num_tokens + 1},): build it with dispatch_plan(idx, num_tokens={num_tokens})"
        )


def _launch_gather(src, idx, weight, dot, out_dtype):
    P, D = idx.shape[0], src.shape[-1]
    out = src.new_empty(P, D, dtype=out_dtype)
    dot_out = src.new_empty(P if dot is not None else 0, dtype=torch.float32)
    if P:
        wrap_triton(_gather_rows)[(P,)](
            src,
            idx,
            weight if weight is not None else src,
            dot if dot is not None else src,
            out,
            dot_out if dot is not None else out,
            D,
            HAS_WEIGHT=weight is not None,
            HAS_DOT=dot is not None,
            BLOCK_D=_block_d(D),
            num_warps=_num_warps(D),
        )
    return out, dot_out


def _launch_segment_sum(base, rows, weight, order, offsets, num_tokens, out_dtype):
    D = rows.shape[-1]
    out = rows.new_empty(num_tokens, D, dtype=out_dtype)
    if num_tokens:
        wrap_triton(_segment_sum)[(num_tokens,)](
            base if base is not None else rows,
            rows,
            weight if weight is not None else rows,
            order,
            offsets,
            out,
            D,
            HAS_BASE=base is not None,
            HAS_WEIGHT=weight is not None,
            BLOCK_D=_block_d(D),
            num_warps=_num_warps(D),
        )
    return out


# ---- ops ---------------------------------------------------------------------------------------------------------
@triton_op("nucleus::expert_gather", mutates_args={})
def expert_gather(x: torch.Tensor, idx: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x[idx] for x (N, D): the chosen tokens' rows in the picks' order (P, D)."""
    if x.ndim != 2:
        raise ValueError(f"expert_gather's x has shape {tuple(x.shape)}; expected (tokens, dim)")
    _check(idx, order, offsets, x.shape[0])
    return _launch_gather(x.contiguous(), idx.contiguous(), None, None, x.dtype)[0]


@triton_op("nucleus::expert_segment_sum", mutates_args={})
def expert_segment_sum(rows: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Per token, the sum of its picks' rows (gather's backward)."""
    return _launch_segment_sum(None, rows.contiguous(), None, order, offsets, num_tokens, rows.dtype)


@triton_op("nucleus::expert_combine", mutates_args={})
def expert_combine(
    base: torch.Tensor | None,
    rows: torch.Tensor,
    weight: torch.Tensor | None,
    idx: torch.Tensor,
    order: torch.Tensor,
    offsets: torch.Tensor,
) -> torch.Tensor:
    """base + sum over picks p of weight_p * rows_p at token idx_p, (N, D); without base the sum alone."""
    num_tokens = offsets.shape[0] - 1
    _check(idx, order, offsets, num_tokens)
    if rows.ndim != 2 or rows.shape[0] != idx.shape[0]:
        raise ValueError(f"expert_combine's rows have shape {tuple(rows.shape)}; expected ({idx.shape[0]}, dim)")
    if base is not None and tuple(base.shape) != (num_tokens, rows.shape[1]):
        raise ValueError(f"expert_combine's base has shape {tuple(base.shape)}; expected {(num_tokens, rows.shape[1])}")
    if weight is not None and tuple(weight.shape) != (idx.shape[0],):
        raise ValueError(f"expert_combine's weight has shape {tuple(weight.shape)}; expected ({idx.shape[0]},)")
    base = base.contiguous() if base is not None else None
    weight = weight.contiguous() if weight is not None else None
    out_dtype = base.dtype if base is not None else rows.dtype
    return _launch_segment_sum(base, rows.contiguous(), weight, order, offsets, num_tokens, out_dtype)


@triton_op("nucleus::expert_combine_backward", mutates_args={})
def expert_combine_backward(
    d_out: torch.Tensor, rows: torch.Tensor, weight: torch.Tensor | None, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d_rows, d_weight): d_rows[p] = weight_p * d_out[idx_p], d_weight[p] = <d_out[idx_p], rows_p> (fp32)."""
    d_out, rows = d_out.contiguous(), rows.contiguous()
    weight = weight.contiguous() if weight is not None else None
    return _launch_gather(d_out, idx.contiguous(), weight, rows if weight is not None else None, rows.dtype)


# ---- autograd ----------------------------------------------------------------------------------------------------
def _gather_setup(ctx, inputs, output):
    x, _, order, offsets = inputs
    ctx.save_for_backward(order, offsets)
    ctx.num_tokens = x.shape[0]


def _gather_backward(ctx, d_rows):
    order, offsets = ctx.saved_tensors
    return expert_segment_sum(d_rows, order, offsets, ctx.num_tokens), None, None, None


def _combine_setup(ctx, inputs, output):
    base, rows, weight, idx, _, _ = inputs
    ctx.save_for_backward(rows, weight, idx)
    ctx.has_base = base is not None
    ctx.base_dtype = base.dtype if base is not None else None


def _combine_backward(ctx, d_out):
    rows, weight, idx = ctx.saved_tensors
    d_rows, d_weight = expert_combine_backward(d_out, rows, weight, idx)
    d_base = d_out.to(ctx.base_dtype) if ctx.has_base else None
    d_weight = d_weight.to(weight.dtype) if weight is not None else None
    return d_base, d_rows, d_weight, None, None, None


expert_gather.register_autograd(_gather_backward, setup_context=_gather_setup)
expert_combine.register_autograd(_combine_backward, setup_context=_combine_setup)
