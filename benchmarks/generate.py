"""Seconds per image: our NucleusPipeline vs diffusers' NucleusMoEImagePipeline, same components, one process.

    python benchmarks/generate.py                                  # CPU: small preset, 128 px, 8 steps, CFG
    python benchmarks/generate.py --preset tiny --size 256 --steps 4
    python benchmarks/generate.py --released --device cuda         # GPU: released preset, 1024 px, 50 steps, CFG

Both pipelines run the same transformer weights (ours shares the reference's tensors), the same VAE and the same
text states (given as prompt_embeds, so text-encoder time is excluded from both), with CFG at the released
default 4.0. The reference runs CFG as two batch-1 forwards per step and recomputes text K/V on every forward;
ours runs one batched forward per step with text K/V computed once per call.

`--released` times the transformer part only (output_type="latent"; the VAE is a tiny stand-in that never runs)
at the released config with random weights in bf16: 1024x1024 (4096 image tokens), 128 text tokens, 50 steps.
The reference's per-step figures in REFERENCE.md section 5 imply ~9.7 s per image on an H100.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformer_forward import build_models  # noqa: E402  (shared weights for ours and the reference)

from nucleus_image.encoders.qwen_image import QwenImageAutoencoder  # noqa: E402
from nucleus_image.model import NucleusConfig  # noqa: E402
from nucleus_image.pipeline import NucleusPipeline  # noqa: E402

RELEASED_ANCHOR_S = 9.7  # 50 steps x ~194 ms (two batch-1 grouped_mm forwards) from REFERENCE.md section 5


def stand_in_vae(latent_channels: int, device, dtype, base_dim: int = 8):
    """An x8 AutoencoderKLQwenImage with the released latent width; random weights, small enough to be cheap."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKLQwenImage(
            base_dim=base_dim,
            z_dim=latent_channels,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * latent_channels,
            latents_std=[1.0] * latent_channels,
        )
    return (vae if dtype == torch.float32 else vae.to(dtype=dtype)).eval()


def text_inputs(cfg: NucleusConfig, batch: int, length: int, device, dtype):
    """Positive states with their last quarter padded (a masked batch, as real prompts give) and shorter
    unpadded negative states, like the empty prompt's."""
    g = torch.Generator(device="cpu").manual_seed(1)
    pos = torch.randn(batch, length, cfg.joint_attention_dim, generator=g).to(device, dtype)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    mask[:, length * 3 // 4 :] = 0
    neg = torch.randn(batch, max(8, length // 4), cfg.joint_attention_dim, generator=g).to(device, dtype)
    return dict(
        prompt_embeds=pos,
        prompt_embeds_mask=mask,
        negative_prompt_embeds=neg,
        negative_prompt_embeds_mask=torch.ones(neg.shape[:2], dtype=torch.long, device=device),
    )


def time_interleaved(fns: dict, device, repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Median seconds per call after one warmup call each; the variants alternate round by round, so a busy
    machine slows them alike. Returns the medians and each variant's last output."""
    outputs = {name: fn() for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outputs[name] = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}, outputs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--released", action="store_true", help="released preset, 1024 px, 50 steps, transformer only")
    ap.add_argument("--preset", default=None, choices=["tiny", "small", "released"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (16 px per token)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1, help="prompts per call")
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=None, help="timed calls of each (default 5 on CPU, 1 on GPU)")
    ap.add_argument("--compile", action="store_true", help="also time ours with the transformer torch.compile'd")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    preset = args.preset or ("released" if args.released else "small")
    size = args.size or (1024 if args.released else 128)
    steps = args.steps or (50 if args.released else 8)
    repeats = args.repeats or (1 if args.released else 5)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = NucleusConfig.preset(preset)
    if preset == "released" and device.type != "cuda":
        print("# warning: --released on the CPU will take a very long time", file=sys.stderr)

    # The reference is built straight on the device in the target dtype and ours shares its tensors (built on
    # the meta device, then assigned), so a 17B model exists once and never as a float32 host copy.
    ref_transformer, transformer = build_models(cfg, device, dtype)
    vae = stand_in_vae(cfg.latent_channels, device, dtype)
    from diffusers import FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline

    ref = NucleusMoEImagePipeline(
        transformer=ref_transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=None,
        processor=None,
    )
    ref.set_progress_bar_config(disable=True)
    ours = NucleusPipeline(transformer, QwenImageAutoencoder(vae))

    output_type = "latent" if args.released else "np"
    texts = text_inputs(cfg, args.batch, args.text_len, device, dtype)
    tokens = (size // 16) ** 2
    latents = torch.randn(args.batch, tokens, cfg.in_channels, generator=torch.Generator().manual_seed(2))
    common = dict(
        guidance_scale=args.guidance,
        height=size,
        width=size,
        num_inference_steps=steps,
        output_type=output_type,
        **texts,
    )
    print(
        f"# {preset} preset, {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
        f"{dtype}, {size}x{size} = {tokens} image tokens, {args.text_len} text tokens, {steps} steps, "
        f"CFG {args.guidance}, batch {args.batch}, {output_type} output, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )

    variants = {
        "ref": lambda: ref(**common, latents=latents.to(device, dtype)).images,
        "ours": lambda: ours(**common, latents=latents, progress=False).images,
    }
    if args.compile:
        # The compiled wrapper forwards attribute access (config, dtype, encode_text) to the model it wraps.
        ours_compiled = NucleusPipeline(
            torch.compile(transformer, fullgraph=True, dynamic=False), QwenImageAutoencoder(vae)
        )
        variants["ours compiled"] = lambda: ours_compiled(**common, latents=latents, progress=False).images
    with torch.inference_mode():
        times, outputs = time_interleaved(variants, device, repeats)
    t_ref, t_ours, out_ref, out_ours = times["ref"], times["ours"], outputs["ref"], outputs["ours"]
    diff = (torch.as_tensor(out_ours).float().cpu() - torch.as_tensor(out_ref).float().cpu()).abs().max().item()
    per_ref, per_ours = t_ref / args.batch, t_ours / args.batch
    print(f"{'pipeline':44s} {'s/image':>9s} {'ms/step':>9s}")
    print(f"{'diffusers NucleusMoEImagePipeline':44s} {per_ref:9.3f} {1000 * t_ref / steps:9.1f}")
    print(f"{'nucleus_image NucleusPipeline':44s} {per_ours:9.3f} {1000 * t_ours / steps:9.1f}")
    if args.compile:
        t_comp = times["ours compiled"]
        print(
            f"{'nucleus_image NucleusPipeline, compiled':44s} {t_comp / args.batch:9.3f} {1000 * t_comp / steps:9.1f}"
        )
        per_ours = min(per_ours, t_comp / args.batch)
    print(f"speedup (diffusers / ours): {per_ref / per_ours:.2f}x   max |output difference|: {diff:.3g}")
    if preset == "released" and size == 1024 and steps == 50:
        print(
            f"vs the ~{RELEASED_ANCHOR_S} s/image REFERENCE.md section 5 implies for diffusers: "
            f"{RELEASED_ANCHOR_S / per_ours:.2f}x"
        )


if __name__ == "__main__":
    main()
