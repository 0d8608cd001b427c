"""The fused Triton kernels (nucleus_image.kernels), forward + backward, against their eager PyTorch references and
those references under torch.compile, at the released model's shapes; each variant's outputs and gradients checked
against eager's. Prints one table row per op and batch.

    python benchmarks/fused_kernels.py                              # GPU: D=2048, S=4096 (1024x1024), B=1,2, bf16
    TRITON_INTERPRET=1 python benchmarks/fused_kernels.py --device cpu --dim 128 --tokens 64 --inner 96 --experts 8 --no-compile

The ops: LayerNorm + modulation and gated residual + LayerNorm + modulation (the blocks'), SwiGLU's activation on
the experts' fused gate/up projection ((B, S, 2F), F = moe_intermediate_dim), and the expert-choice dispatch: the
plan, the gather of E experts' C = ceil(CF * S / E) tokens each and the weighted combine onto the shared expert's
output (experts left out: rows go straight back). A call is one forward of the op and one backward from fixed
random cotangents of all its outputs (the blocks use every output but ln_modulate's norm; all are differentiated
here, the heavier case). Errors: max |x - eager| / max |eager| over outputs and gradients; bf16 target 2e-2 (eager
rounds every intermediate to bf16, the kernels each output once from fp32).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transformer_forward import timeit  # noqa: E402

OPS = ("ln_modulate", "gated_residual_ln_modulate", "swiglu", "expert_dispatch")


@dataclass(frozen=True)
class Shapes:
    """The released model's: hidden 2048, 64 experts of 1344 features, capacity factor 2 (most MoE layers)."""

    batch: int
    tokens: int
    dim: int = 2048
    inner: int = 1344
    experts: int = 64
    capacity_factor: float = 2.0


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def _dispatch_triton(x, base, weight, idx):
    from nucleus_image.kernels.expert_dispatch import dispatch_plan

    plan = dispatch_plan(idx, x.shape[0])
    rows = torch.ops.nucleus.expert_gather(x, idx, *plan)
    return (torch.ops.nucleus.expert_combine(base, rows, weight, idx, *plan),)


def _dispatch_eager(x, base, weight, idx):
    from nucleus_image.kernels.expert_dispatch import expert_combine_reference, expert_gather_reference

    return (expert_combine_reference(base, expert_gather_reference(x, idx), weight, idx, x.shape[0]),)


def op_variants(op: str, compile_: bool) -> dict:
    """{variant: fn(*inputs) -> tuple of outputs}: the Triton op, its eager reference and (with compile_) that
    compiled."""
    from nucleus_image.kernels import expert_dispatch, norm_modulation, swiglu  # noqa: F401  (registers the ops)

    if op == "swiglu":
        variants = {
            "triton": lambda h: (torch.ops.nucleus.swiglu(h, True),),
            "eager": lambda h: (swiglu.swiglu_reference(h, True),),
        }
    elif op == "expert_dispatch":
        variants = {"triton": _dispatch_triton, "eager": _dispatch_eager}
    else:
        variants = {"triton": getattr(torch.ops.nucleus, op), "eager": getattr(norm_modulation, f"{op}_reference")}
    if compile_:
        variants["compiled"] = torch.compile(variants["eager"], dynamic=False)
    return variants


def op_inputs(op: str, shapes: Shapes, dtype: torch.dtype, device: torch.device) -> list:
    """The op's inputs as the model makes them (scale and gate per sample; the blocks pass no shift; expert choice
    picks C distinct tokens per expert and sample)."""
    g = torch.Generator(device).manual_seed(0)
    B, S, D = shapes.batch, shapes.tokens, shapes.dim

    def rand(*shape, spread=1.0):
        return (torch.randn(shape, generator=g, device=device) * spread).to(dtype).requires_grad_()

    if op == "swiglu":
        return [rand(B, S, 2 * shapes.inner)]
    if op == "expert_dispatch":
        E = shapes.experts
        C = max(1, math.ceil(shapes.capacity_factor * S / E))
        scores = torch.rand(B, E, S, generator=g, device=device)
        idx_BEC = scores.topk(C, dim=-1).indices
        flat = (idx_BEC + torch.arange(B, device=device).view(B, 1, 1) * S).transpose(0, 1).reshape(-1)
        weight = torch.rand(flat.numel(), generator=g, device=device).to(dtype).requires_grad_()
        return [rand(B * S, D), rand(B * S, D), weight, flat]
    x = rand(B, S, D)
    if op == "ln_modulate":
        return [x, rand(B, 1, D, spread=0.1), None, 1e-6]
    return [x, rand(B, S, D), rand(B, 1, D, spread=0.5), rand(B, 1, D, spread=0.1), None, 1e-6]


def measure(op: str, shapes: Shapes, dtype, device, compile_: bool, iters: int, warmup: int = 2) -> dict:
    """{"ms": {variant: median ms of forward + backward}, "error": {variant: max rel error vs eager}}; `warmup`
    untimed calls first (0 under Triton's interpreter, which has nothing to warm up)."""
    args = op_inputs(op, shapes, dtype, device)
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    variants = op_variants(op, compile_)
    with torch.no_grad():
        shapes = [o.shape for o in variants["eager"](*args)]
    g = torch.Generator(device).manual_seed(1)
    cotangents = [torch.randn(s, generator=g, device=device).to(dtype) for s in shapes]

    def call(fn):
        outs = fn(*args)
        return list(outs) + list(torch.autograd.grad(outs, tensors, cotangents))

    results = {name: call(fn) for name, fn in variants.items()}
    error = {
        name: max(rel_max(a, b) for a, b in zip(res, results["eager"]))
        for name, res in results.items()
        if name != "eager"
    }
    ms = timeit({name: (lambda fn=fn: call(fn)) for name, fn in variants.items()}, device, warmup=warmup, iters=iters)
    return {"ms": ms, "error": error}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dim", type=int, default=2048, help="hidden size (released: 2048)")
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens per sample (1024x1024: 4096)")
    ap.add_argument("--inner", type=int, default=1344, help="expert features (released: 1344)")
    ap.add_argument("--experts", type=int, default=64, help="experts (released: 64)")
    ap.add_argument("--capacity-factor", type=float, default=2.0, help="expert capacity factor (released: 2 mostly)")
    ap.add_argument("--batches", default="1,2", help="batch sizes (default 1,2)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variant")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(
        f"D={args.dim}, S={args.tokens}, F={args.inner}, E={args.experts}, CF={args.capacity_factor:g}, {args.dtype}, "
        f"{device}; ms per forward + backward (median of {args.iters})"
    )
    print("| op | B | triton ms | eager ms | compiled ms | triton vs compiled | max rel error |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for op in OPS:
        for batch in (int(b) for b in args.batches.split(",")):
            shapes = Shapes(batch, args.tokens, args.dim, args.inner, args.experts, args.capacity_factor)
            r = measure(op, shapes, dtype, device, args.compile, args.iters)
            ms, compiled = r["ms"], r["ms"].get("compiled")
            ratio = f"{compiled / ms['triton']:.2f}x" if compiled else "-"
            errors = ", ".join(f"{k} {v:.1e}" for k, v in r["error"].items())
            cells = [op, batch, f"{ms['triton']:.3f}", f"{ms['eager']:.3f}", f"{compiled:.3f}" if compiled else "-"]
            print("| " + " | ".join(str(c) for c in cells + [ratio, errors]) + " |")
            worst = max(worst, *r["error"].values())
    bound = 2e-2 if dtype == torch.bfloat16 else 1e-5
    print(f"worst error {worst:.2e} (bound {bound:g})")
    return 0 if worst <= bound else 1


if __name__ == "__main__":
    sys.exit(main())
