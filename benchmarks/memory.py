"""Generation memory, planned and measured: transformer weights in bf16 / int8 / fp8 on small models on the CPU,
against the planner (`nucleus_image.planning.plan_generation`), then the planner's figures for the released preset.

    python benchmarks/memory.py                               # small preset, 512x512, batch 2 (one CFG image)
    python benchmarks/memory.py --preset tiny --size 256

Measured, per weight format, in a fresh subprocess each: the transformer's weight bytes (every stored tensor,
torchao's codes and scales included: exact), and the peak resident-memory growth of loading the model from a bf16
checkpoint in 32 MB shards (quantized tensor by tensor while loading, as `load_transformer(..., quantize=)` does)
and running one CFG forward at the size (the kernel's VmHWM, reset after imports and inputs, over the RSS then; it counts the
mapped shard being read and the CPU allocator's caching, so it is an upper bound on live tensor bytes). Released: the targets of issue 12 are a transformer of <= 18 GB and a
1024x1024 image on a 24 GB card with the 16.5 GB Qwen3-VL text encoder offloaded after encoding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

GB, GIB = 10**9, 2**30
QWEN3_VL_BYTES = int(16.5e9)  # the released text encoder in bf16 (DESIGN-distributed.md section 5)
FORMATS = ("bf16", "int8", "fp8")


def tensor_bytes(t) -> int:
    names = getattr(t, "tensor_data_names", None)
    if names is None:
        return t.numel() * t.element_size()
    return sum(tensor_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (Linux: clear_refs 5) so it counts from now; returns the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_bytes("VmRSS")


def measure(preset: str, weights: str, size: int, checkpoint: str) -> dict:
    """Run in a subprocess: weight bytes and peak RSS growth (KiB on Linux) of load + one CFG forward."""
    import torch
    import torchao.quantization  # noqa: F401  (imported before the baseline: code is not memory the plan covers)

    from nucleus_image.model import NucleusConfig
    from nucleus_image.quantization import load_transformer

    torch.set_num_threads(1)
    cfg = NucleusConfig.preset(preset)
    h = w = size // 16
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, h * w, cfg.in_channels, generator=g).bfloat16()
    txt = torch.randn(2, 128, cfg.joint_attention_dim, generator=g).bfloat16()
    t = torch.full((2,), 0.5, dtype=torch.bfloat16)
    base = _reset_peak_rss()
    model = load_transformer(checkpoint, quantize=None if weights == "bf16" else weights)
    weight_bytes = sum(tensor_bytes(v) for v in model.state_dict().values())
    with torch.inference_mode():
        model(hidden_states=x, img_shapes=[(1, h, w)] * 2, encoder_hidden_states=txt, timestep=t)
    peak = _status_bytes("VmHWM") - base
    return {"weight_bytes": weight_bytes, "peak_rss_growth": peak}


def measured(preset: str, weights: str, size: int, checkpoint: str) -> dict:
    code = (
        f"import json, sys; sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r}); from memory import measure; "
        f"print(json.dumps(measure({preset!r}, {weights!r}, {size}, {checkpoint!r})))"
    )
    # glibc serves freed blocks under its (growing) mmap threshold from the heap and keeps them resident; a fixed
    # 64 KiB threshold returns large transients to the system, so the peak tracks live tensor bytes more closely.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    import tempfile

    import torch

    from nucleus_image.model import NucleusConfig, NucleusTransformer
    from nucleus_image.planning import plan_generation

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args(argv)

    cfg = NucleusConfig.preset(args.preset)
    tmp = tempfile.TemporaryDirectory()
    torch.manual_seed(0)
    NucleusTransformer(cfg).bfloat16().save_pretrained(tmp.name, max_shard_size="32MB")
    print(
        f"# {args.preset} preset on the CPU, bf16 compute, batch 2 (one CFG image), {args.size}x{args.size}, "
        f"prompt states given (no text encoder)"
    )
    print(
        f"{'weights':8s} {'planned weights':>16s} {'measured':>10s} {'ratio':>6s} {'planned peak':>13s} "
        f"{'measured RSS peak':>18s} {'ratio':>6s}"
    )
    for weights in FORMATS:
        plan = plan_generation(cfg, weights=weights, height=args.size, width=args.size, batch=2)
        m = measured(args.preset, weights, args.size, tmp.name)
        print(
            f"{weights:8s} {plan.transformer_weights / 2**20:13.1f} MiB {m['weight_bytes'] / 2**20:6.1f} MiB "
            f"{m['weight_bytes'] / plan.transformer_weights:6.3f} {plan.peak / 2**20:9.1f} MiB "
            f"{m['peak_rss_growth'] / 2**20:14.1f} MiB {m['peak_rss_growth'] / plan.peak:6.3f}"
        )

    released = NucleusConfig.preset("released")
    print(
        "\n# released preset, planned: one 1024x1024 image with CFG (batch 2), 128 text tokens, Qwen3-VL text "
        "encoder 16.5 GB"
    )
    print(
        f"{'weights':8s} {'transformer':>12s} {'activations':>12s} {'peak, encoder offloaded':>24s} "
        f"{'peak, encoder resident':>23s}  targets"
    )
    for weights in FORMATS:
        off = plan_generation(
            released,
            weights=weights,
            height=1024,
            width=1024,
            batch=2,
            text_encoder_bytes=QWEN3_VL_BYTES,
            offload_text_encoder=True,
        )
        on = plan_generation(
            released,
            weights=weights,
            height=1024,
            width=1024,
            batch=2,
            text_encoder_bytes=QWEN3_VL_BYTES,
            offload_text_encoder=False,
        )
        verdict = (
            f"transformer <= 18 GB: {'yes' if off.transformer_weights <= 18 * GB else 'NO'}, "
            f"fits 24 GB: {'yes' if off.peak <= 24 * GB else 'NO'}"
        )
        print(
            f"{weights:8s} {off.transformer_weights / GB:9.2f} GB {off.activations / GB:9.2f} GB "
            f"{off.peak / GB:21.2f} GB {on.peak / GB:20.2f} GB  {verdict}"
        )


if __name__ == "__main__":
    main()
