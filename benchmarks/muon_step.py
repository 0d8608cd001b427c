"""Muon's step, grouped (one batched Newton-Schulz per matrix shape) vs one matrix at a time, on a preset's Muon
parameters, in one process with the two timed interleaved.

    python benchmarks/muon_step.py                          # tiny and small presets, 1 thread, float32 NS (CPU)
    python benchmarks/muon_step.py --presets small --threads 2 --repeats 10
    python benchmarks/muon_step.py --device cuda --presets released --ns-dtype bf16

Both arms start from the same weights and take the same random gradients; each step of one is followed by the same
step of the other (alternating which goes first), so a busy machine slows them alike. Prints the median ms per step
of each, the ratio, and the largest difference between the two arms' weights after all steps (0 on one CPU thread:
the grouped step is the per-matrix one, batched).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nucleus_image.model import NucleusConfig, NucleusTransformer
from nucleus_image.training.muon import Muon, orthogonalize, update_scale
from nucleus_image.training.optim import split_params


class PerMatrixMuon:
    """Textbook Muon one matrix at a time (as `torch.optim.Muon` runs): momentum, Nesterov, every matrix (every
    expert's, for stacks and `factors`) orthogonalised alone, decoupled weight decay. The reference the grouped
    step is tested against (tests/test_muon.py) and timed against here."""

    def __init__(
        self,
        params,
        lr: float,
        weight_decay: float,
        momentum: float = 0.95,
        ns_dtype=torch.float32,
        factors: dict | None = None,
    ):
        self.params, self.lr, self.wd, self.mu, self.dtype = list(params), lr, weight_decay, momentum, ns_dtype
        self.factors = factors or {}
        self.state: dict[torch.Tensor, torch.Tensor] = {}

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            buf = self.state.setdefault(p, torch.zeros_like(p))
            buf.lerp_(p.grad, 1 - self.mu)
            update = p.grad.lerp(buf, self.mu)
            view = self.factors[p].matrices if p in self.factors else (lambda t: t if t.dim() == 3 else t.unsqueeze(0))
            p.mul_(1 - self.lr * self.wd)
            for target, u in zip(view(p.data), view(update)):
                target.add_(orthogonalize(u, dtype=self.dtype), alpha=-self.lr * update_scale(u.shape))


def muon_shapes(preset: str) -> list[torch.Size]:
    with torch.device("meta"):
        model = NucleusTransformer(NucleusConfig.preset(preset))
    return [p.shape for _, p in split_params(model)["muon"]]


def compare(preset: str, device: torch.device, ns_dtype: torch.dtype, repeats: int) -> dict:
    shapes = muon_shapes(preset)
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(device) * s[-2] ** -0.5 for s in shapes]
    arms = {}
    for name in ("grouped", "per matrix"):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = (
            Muon(params, lr=0.02, weight_decay=0.1, ns_dtype=ns_dtype)
            if name == "grouped"
            else PerMatrixMuon(params, lr=0.02, weight_decay=0.1, ns_dtype=ns_dtype)
        )
        arms[name] = (params, opt)
    times = {name: [] for name in arms}
    order = list(arms)
    for step in range(repeats + 1):  # the first step of each (momentum allocation) is not timed
        grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
        for name in order:
            params, opt = arms[name]
            for p, g in zip(params, grads):
                p.grad = g
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step:
                times[name].append(time.perf_counter() - t0)
        order.reverse()
    diff = max((a - b).abs().max().item() for a, b in zip(arms["grouped"][0], arms["per matrix"][0]))
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    return {
        "preset": preset,
        "matrices": sum(s[0] if len(s) == 3 else 1 for s in shapes),
        "tensors": len(shapes),
        "shapes": len({tuple(sorted(s[-2:])) for s in shapes}),
        "grouped_ms": ms["grouped"],
        "per_matrix_ms": ms["per matrix"],
        "speedup": ms["per matrix"] / ms["grouped"],
        "max_abs_diff": diff,
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="tiny,small", help="comma-separated model presets (default tiny,small)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--ns-dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--repeats", type=int, default=20, help="timed steps per arm (default 20)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    ns_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.ns_dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    print(
        f"# Muon step, {device}, {args.threads} thread(s), Newton-Schulz in {ns_dtype}, {args.repeats} interleaved "
        f"steps per arm, torch {torch.__version__}"
    )
    print("| preset | Muon tensors | matrices | matrix shapes | per matrix ms | grouped ms | speedup | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for preset in args.presets.split(","):
        r = compare(preset, device, ns_dtype, args.repeats)
        rows.append(r)
        print(
            f"| {preset} | {r['tensors']} | {r['matrices']} | {r['shapes']} | {r['per_matrix_ms']:.2f} | "
            f"{r['grouped_ms']:.2f} | {r['speedup']:.2f}x | {r['max_abs_diff']:.2g} |",
            flush=True,
        )
    return rows


if __name__ == "__main__":
    main()
