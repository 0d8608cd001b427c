"""The fused LayerNorm + modulation kernels (nucleus_image.kernels.norm_modulation), forward + backward, against
their eager PyTorch references and those references under torch.compile, at the released block's shapes; each
variant's outputs and gradients checked against eager's. Prints one table row per op and batch.

    python benchmarks/norm_kernels.py                              # GPU: D=2048, S=4096 (1024x1024), B=1,2, bf16
    TRITON_INTERPRET=1 python benchmarks/norm_kernels.py --device cpu --dim 128 --tokens 64 --no-compile

A call is one forward of the op and one backward from fixed random cotangents of all its outputs (the blocks use
every output but ln_modulate's norm; all are differentiated here, the heavier case). Errors: max |x - eager| /
max |eager| over outputs and gradients; bf16 target 2e-2 (eager rounds every intermediate to bf16, the kernels
each output once from fp32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transformer_forward import timeit  # noqa: E402

OPS = ("ln_modulate", "gated_residual_ln_modulate")


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def op_variants(op: str, compile_: bool) -> dict:
    """{variant: fn(*inputs) -> outputs}: the Triton op, its eager reference and (with compile_) that compiled."""
    from nucleus_image.kernels import norm_modulation

    reference = getattr(norm_modulation, f"{op}_reference")
    variants = {"triton": getattr(torch.ops.nucleus, op), "eager": reference}
    if compile_:
        variants["compiled"] = torch.compile(reference, dynamic=False)
    return variants


def op_inputs(op: str, batch: int, tokens: int, dim: int, dtype: torch.dtype, device: torch.device) -> list:
    """The op's tensors as the block makes them (scale and gate per sample; the blocks pass no shift)."""
    g = torch.Generator(device).manual_seed(0)

    def rand(*shape, spread=1.0):
        return (torch.randn(shape, generator=g, device=device) * spread).to(dtype).requires_grad_()

    x = rand(batch, tokens, dim)
    if op == "ln_modulate":
        return [x, rand(batch, 1, dim, spread=0.1), None, 1e-6]
    return [x, rand(batch, tokens, dim), rand(batch, 1, dim, spread=0.5), rand(batch, 1, dim, spread=0.1), None, 1e-6]


def measure(op: str, batch: int, tokens: int, dim: int, dtype, device, compile_: bool, iters: int) -> dict:
    """{"ms": {variant: median ms of forward + backward}, "error": {variant: max rel error vs eager}}."""
    args = op_inputs(op, batch, tokens, dim, dtype, device)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
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
    ms = timeit({name: (lambda fn=fn: call(fn)) for name, fn in variants.items()}, device, warmup=2, iters=iters)
    return {"ms": ms, "error": error}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dim", type=int, default=2048, help="hidden size (released: 2048)")
    ap.add_argument("--tokens", type=int, default=4096, help="image tokens per sample (1024x1024: 4096)")
    ap.add_argument("--batches", default="1,2", help="batch sizes (default 1,2)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variant")
    args = ap.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"D={args.dim}, S={args.tokens}, {args.dtype}, {device}; ms per forward + backward (median of {args.iters})")
    print("| op | B | triton ms | eager ms | compiled ms | triton vs compiled | max rel error |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for op in OPS:
        for batch in (int(b) for b in args.batches.split(",")):
            r = measure(op, batch, args.tokens, args.dim, dtype, device, args.compile, args.iters)
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
