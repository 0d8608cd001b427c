"""Our transformer forward vs diffusers' NucleusMoEImageTransformer2DModel: same config, same weights, one process.

    python benchmarks/transformer_forward.py --preset small                       # CPU, fp32
    python benchmarks/transformer_forward.py --preset released --device cuda --dtype bf16 --batch 2 --size 1024

Baselines: the reference with its expert for-loop, with grouped_mm (the released default), and with grouped_mm
plus its TextKVCache hook (its best). Ours: recomputing text K/V each call, with text K/V computed once
(`encode_text` -> `text_kv=`, as every denoising step after the first runs), and optionally torch.compile'd.
Prints ms per forward, an estimated TFLOP/s, and each time's ratio to the reference's best.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from nucleus_image.model import NucleusConfig, NucleusTransformer


def flops_per_forward(cfg: NucleusConfig, batch: int, seq: int, text: int) -> float:
    """Matmul FLOPs of one forward (2 per multiply-add), image tokens through every block plus text K/V."""
    d, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.attention_head_dim
    per_tok = 2 * d * d + 2 * d * kv + 4 * d * d  # q, out; k, v; modulation (4d x d)
    per_text = cfg.joint_attention_dim * d + 2 * d * kv
    total = 0.0
    for i in range(cfg.num_layers):
        if i in cfg.moe_layers:
            mlp = 3 * d * cfg.moe_intermediate_dim * (1 + cfg.capacity_factors[i]) + 2 * d * cfg.num_experts
        else:
            mlp = 3 * d * cfg.dense_mlp_dim
        total += 2 * batch * seq * (per_tok + mlp) + 2 * batch * text * per_text
        total += 4 * batch * seq * (seq + text) * d  # QK^T and PV
    return total


def timeit(fns: dict, device, warmup: int, iters: int) -> dict[str, float]:
    """Median ms per call. Variants run interleaved, round by round, so a busy machine slows them alike."""

    def once(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            times[name].append(once(fn))
    return {name: statistics.median(ts) * 1000 for name, ts in times.items()}


def set_expert_path(ref, grouped: bool) -> None:
    for blk in ref.transformer_blocks:
        if blk.moe_enabled:
            blk.img_mlp.experts.use_grouped_mm = grouped


def build_models(cfg: NucleusConfig, device, dtype):
    """The reference built directly on the device in the target dtype; ours shares its very tensors."""
    from diffusers import NucleusMoEImageTransformer2DModel

    ref_cfg = {k: v for k, v in cfg.to_dict().items() if not k.startswith("_")}
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            ref = NucleusMoEImageTransformer2DModel(**ref_cfg).eval()
    finally:
        torch.set_default_dtype(prev)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 3:  # the reference leaves its expert tensors uninitialised
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
            elif "norm" in name or "img_mod" in name or "norm_out" in name:
                p.normal_(0.0, 0.05, generator=g).add_(1.0 if "norm" in name and p.ndim == 1 else 0.0)
    with torch.device("meta"):
        ours = NucleusTransformer(cfg)
    ours.load_state_dict(ref.state_dict(), assign=True)
    return ref, ours.eval()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "released"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--batch", type=int, default=2, help="2 = one CFG step in one batch")
    ap.add_argument("--size", type=int, default=None, help="image side in pixels (16 px per token); default by preset")
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(ours)")
    ap.add_argument("--skip-loop", action="store_true", help="skip the reference's slow expert for-loop")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    size = args.size or {"tiny": 256, "small": 512, "released": 1024}[args.preset]
    iters = args.iters or (10 if device.type == "cuda" else 5)
    cfg = NucleusConfig.preset(args.preset)
    h = w = size // 16
    seq = h * w
    ref, ours = build_models(cfg, device, dtype)
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(args.batch, seq, cfg.in_channels, device=device, dtype=dtype, generator=g)
    txt = torch.randn(args.batch, args.text_len, cfg.joint_attention_dim, device=device, dtype=dtype, generator=g)
    t = torch.rand(args.batch, device=device, dtype=dtype, generator=g)
    shapes = [(1, h, w)] * args.batch
    kw = dict(hidden_states=x, img_shapes=shapes, encoder_hidden_states=txt, timestep=t)
    flops = flops_per_forward(cfg, args.batch, seq, args.text_len)
    print(
        f"# {args.preset} preset, {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}), "
        f"{dtype}, batch {args.batch}, {size}x{size} = {seq} image tokens, {args.text_len} text tokens, "
        f"{flops / 1e12:.2f} TFLOP per forward, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )

    def ref_call(grouped: bool):
        return lambda: (set_expert_path(ref, grouped), ref(**kw, return_dict=False))

    with torch.inference_mode():
        text_kv = ours.encode_text(txt, None, shapes)
        cached = dict(hidden_states=x, img_shapes=shapes, timestep=t, text_kv=text_kv)
        phase_a = {} if args.skip_loop else {"reference for-loop": ref_call(False)}
        phase_a.update(
            {
                "reference grouped_mm": ref_call(True),
                "ours": lambda: ours(**kw),
                "ours + text_kv once": lambda: ours(**cached),
            }
        )
        if args.compile:
            compiled = torch.compile(ours, fullgraph=True, dynamic=False)
            phase_a["ours + text_kv once, compiled"] = lambda: compiled(**cached)
        results = timeit(phase_a, device, args.warmup, iters)
        try:
            from diffusers import TextKVCacheConfig
        except ImportError:  # older diffusers without the hook
            TextKVCacheConfig = None
        if TextKVCacheConfig is not None:
            # The hook computes text K/V on its first call and reuses them for the same tensor afterwards, so
            # every timed call after warmup is a cache hit, like denoising steps 2..N. Timed in a second phase,
            # interleaved with ours again, because the hook stays on the module while enabled.
            ref.enable_cache(TextKVCacheConfig())
            phase_b = {
                "reference grouped_mm + TextKVCache": ref_call(True),
                "ours + text_kv once (phase 2)": lambda: ours(**cached),
            }
            results.update(timeit(phase_b, device, args.warmup, iters))
            ref.disable_cache()
    baseline = min(v for k, v in results.items() if k.startswith("reference"))

    print(f"{'forward':42s} {'ms':>9s} {'TFLOP/s':>8s} {'vs ref best':>11s}")
    for name, ms in results.items():
        print(f"{name:42s} {ms:9.2f} {flops / ms / 1e9:8.1f} {baseline / ms:10.2f}x")
    best = min(v for k, v in results.items() if k.startswith("ours"))
    print(f"speedup of our best over the reference's best: {baseline / best:.2f}x")


if __name__ == "__main__":
    main()
