"""The released model's classifier-free-guided denoising step on a GPU: ours eager, compiled, compiled and captured
whole in a CUDA graph, and with fp8 expert and attention matmuls, against diffusers' transformer, in one run; then
a QLoRA training step (int8 base, rank-16 adapters) with its peak memory.

    python benchmarks/gpu_step.py                                    # released preset, batch 2 (CFG), 1024x1024, bf16
    python benchmarks/gpu_step.py --device cpu --preset tiny --size 256 --no-compile --iters 3   # smoke run on CPU

A step = one forward over the conditional and unconditional rows (text K/V computed once per call, as from step 2
of a generation), guidance, and the Euler update, all on the device. Weights are random (scaled like a trained
model's); ours shares the reference's very tensors, the fp8 variant converts a copy of the experts and attention
projections. Every variant's next latents are compared with the eager bf16 step's (relative L2): the bf16 variants
must agree to rounding (routing ties at random weights can flip, hence 2e-2), the fp8 ones within 0.1. Targets
(issue 12, H100/H200): <= 45 ms bf16 and <= 30 ms fp8 against diffusers' 103.5 ms. Exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transformer_forward import build_models, flops_per_forward, timeit  # noqa: E402

from nucleus_image.diffusion.flow import euler_step  # noqa: E402
from nucleus_image.diffusion.guidance import guided  # noqa: E402
from nucleus_image.model import NucleusConfig, NucleusTransformer  # noqa: E402
from nucleus_image.pipeline.cuda_graph import WARMUP_STEPS, GraphedStep  # noqa: E402
from nucleus_image.pipeline.denoise import denoise_step  # noqa: E402
from nucleus_image.quantization.fp8_compute import enable_fp8_compute  # noqa: E402

GUIDANCE = 4.0


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def step_variants(args, device, dtype) -> tuple[dict, dict, float]:
    cfg = NucleusConfig.preset(args.preset)
    h = w = args.size // 16
    seq, rows = h * w, 2
    ref, ours = build_models(cfg, device, dtype)
    g = torch.Generator(device=device).manual_seed(1)
    latents = torch.randn(1, seq, cfg.in_channels, device=device, generator=g)
    txt = torch.randn(rows, args.text_len, cfg.joint_attention_dim, device=device, dtype=dtype, generator=g)
    t_R = torch.full((rows,), 0.7, device=device, dtype=dtype)
    sigma, sigma_next = torch.tensor(0.7, device=device), torch.tensor(0.66, device=device)
    shapes = [(1, h, w)] * rows
    call = (latents, t_R, sigma, sigma_next)
    flops = flops_per_forward(cfg, rows, seq, args.text_len)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"# {args.preset} preset, {name}, {dtype}, CFG step of 1 image = {rows} rows, {args.size}x{args.size} = "
        f"{seq} image tokens, {args.text_len} text tokens, {flops / 1e12:.2f} TFLOP per step, torch {torch.__version__}"
    )

    with torch.inference_mode():
        kv = ours.encode_text(txt, None, shapes)
        with torch.device("meta"):
            fp8_model = NucleusTransformer(cfg)
        fp8_model.load_state_dict(ours.state_dict(), assign=True)
        fp8_model = enable_fp8_compute(fp8_model.eval())
        fp8_kv = fp8_model.encode_text(txt, None, shapes)

        def ref_step(latents, t_R, sigma, sigma_next):
            x = latents.to(dtype)
            pred = ref(
                hidden_states=torch.cat([x, x]),
                img_shapes=shapes,
                encoder_hidden_states=txt,
                timestep=t_R,
                return_dict=False,
            )[0]
            return euler_step(latents, guided(pred.float(), GUIDANCE), sigma, sigma_next)

        steps = {
            "diffusers reference (grouped_mm)": ref_step,
            "ours eager": partial(denoise_step, ours, text_kv=kv, img_shapes=shapes, guidance_scale=GUIDANCE),
            "ours fp8 eager": partial(
                denoise_step, fp8_model, text_kv=fp8_kv, img_shapes=shapes, guidance_scale=GUIDANCE
            ),
        }
        if args.compile:
            compiled = torch.compile(ours, fullgraph=True, dynamic=False)
            compiled_fp8 = torch.compile(fp8_model, fullgraph=True, dynamic=False)
            steps["ours compiled"] = partial(
                denoise_step, compiled, text_kv=kv, img_shapes=shapes, guidance_scale=GUIDANCE
            )
            steps["ours fp8 compiled"] = partial(
                denoise_step, compiled_fp8, text_kv=fp8_kv, img_shapes=shapes, guidance_scale=GUIDANCE
            )
        if device.type == "cuda":
            for base in [k for k in list(steps) if k.startswith("ours")]:
                t0 = time.perf_counter()
                graphed = GraphedStep(steps[base])
                for _ in range(WARMUP_STEPS + 1):  # the eager warm-up steps, then the capture and a first replay
                    graphed(*call)
                torch.cuda.synchronize()
                steps[f"{base} + CUDA graph"] = graphed
                print(f"captured {base!r} in {time.perf_counter() - t0:.1f} s")
        expected = steps["ours eager"](*call).clone()
        errors = {k: rel_l2(fn(*call), expected) for k, fn in steps.items()}
        try:
            from diffusers import TextKVCacheConfig

            ref.enable_cache(TextKVCacheConfig())  # the reference at its best: text K/V reused like ours
        except ImportError:
            pass
        results = timeit({k: partial(fn, *call) for k, fn in steps.items()}, device, args.warmup, args.iters)
    return results, errors, flops


def qlora_step(args, device) -> dict:
    """One QLoRA training step of the preset at batch 1 (int8 base, rank-16 adapters, gradient checkpointing): its
    median ms, peak memory (GiB; NaN on CPU) and adapter parameters."""
    from nucleus_image.adapters import add_lora
    from nucleus_image.quantization import quantize_transformer
    from nucleus_image.training.config import OptimizerConfig
    from nucleus_image.training.optim import build_optimizers

    cfg = NucleusConfig.preset(args.preset)
    h = w = args.size // 16
    with torch.device("meta"):
        model = NucleusTransformer(cfg).to(torch.bfloat16)
    model = model.to_empty(device=device)  # bf16 from the start: an fp32 build of the release would take 68 GB
    model.reset_parameters()
    quantize_transformer(model, "int8")
    model.enable_gradient_checkpointing()
    peft_model = add_lora(model, rank=16)
    muon, adamw, _ = build_optimizers(peft_model, OptimizerConfig(lr=1e-4), torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(1, h * w, cfg.in_channels, device=device, dtype=torch.bfloat16, generator=g)
    txt = torch.randn(1, args.text_len, cfg.joint_attention_dim, device=device, dtype=torch.bfloat16, generator=g)
    t = torch.full((1,), 0.5, device=device, dtype=torch.bfloat16)

    def train_step():
        out = peft_model(hidden_states=x, img_shapes=[(1, h, w)], encoder_hidden_states=txt, timestep=t).sample
        out.float().square().mean().backward()
        muon.step()
        adamw.step()
        muon.zero_grad(set_to_none=True)
        adamw.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ms = timeit({"qlora": train_step}, device, 1, max(2, args.iters // 4))["qlora"]
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    print(
        f"QLoRA step (int8 base, rank 16, {trainable / 1e6:.1f}M adapter params, batch 1, {args.size}x{args.size}, "
        f"gradient checkpointing): {ms:.1f} ms, peak memory {peak:.1f} GiB"
    )
    return {"ms": ms, "peak_gib": peak, "adapter_params": trainable}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="released", choices=["tiny", "small", "released"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile variants")
    ap.add_argument("--skip-qlora", action="store_true", help="skip the QLoRA training step")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_step: error: no CUDA device; pass --device cpu for a smoke run", file=sys.stderr)
        return 2
    dtype = torch.bfloat16
    results, errors, flops = step_variants(args, device, dtype)
    baseline = results["diffusers reference (grouped_mm)"]
    failed = []
    print(f"{'CFG step':44s} {'ms':>9s} {'TFLOP/s':>8s} {'vs diffusers':>12s} {'rel L2 vs eager':>16s}")
    for name, ms in results.items():
        bound = 0.1 if "fp8" in name else 2e-2
        ok = errors[name] <= bound
        failed += [] if ok else [name]
        print(
            f"{name:44s} {ms:9.2f} {flops / ms / 1e9:8.1f} {baseline / ms:11.2f}x {errors[name]:15.4f}"
            f"{'' if ok else f'  CHECK FAILED (> {bound})'}"
        )
    if not args.skip_qlora:
        del results
        if device.type == "cuda":
            torch.cuda.empty_cache()
        qlora_step(args, device)
    if failed:
        print(f"correctness checks failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
