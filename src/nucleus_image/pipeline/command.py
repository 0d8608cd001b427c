"""The `nucleus generate` command line that regenerates one image. `nucleus generate` writes it into each image's
sidecar and PNG metadata, `nucleus serve` returns it with each image; both build it here from the settings, so the
two cannot drift apart. Every setting that changes the pixels is spelled out, defaults included, so a later change
of a default cannot alter what the command draws.

    generate_command("runs/demo/merged", "a red cube", seed=7, width=64, height=64, steps=16, guidance=4.0)
    # "nucleus generate --model /abs/runs/demo/merged --prompt 'a red cube' ... --seed 7 --num-images 1 ... --out OUT"
"""

from __future__ import annotations

import shlex
from pathlib import Path

from nucleus_image.pipeline.step_cache import StepCacheConfig


def model_name(model: str) -> str:
    """An absolute path for a local folder; a Hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def cache_flags(config: StepCacheConfig | None) -> list[str]:
    """`--cache` flags that rebuild `config` exactly (every field spelled out)."""
    if config is None:
        return []
    fields = config.to_dict()
    return ["--cache", fields.pop("policy")] + [
        part for name, value in fields.items() for part in (f"--cache-{name}", repr(value))
    ]


def generate_command(
    model: str,
    prompt: str,
    *,
    seed: int,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    negative: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    quantize: str | None = None,
    cache: StepCacheConfig | None = None,
    cuda_graph: bool = False,
    fp8_compute: bool = False,
    aspect: str | None = None,
    lora: str | None = None,
    lora_scale: float = 1.0,
) -> str:
    """The shell command drawing this one image into the folder OUT (the image's seed is `seed`). The size as it
    was asked for (an aspect preset or pixels), so the regenerated image records the same settings. `lora`: the
    adapter folder attached (its sampler settings' noise levels apply again, as --steps is its step count)."""
    size = ["--aspect", aspect] if aspect else ["--width", str(width), "--height", str(height)]
    parts = [
        "nucleus",
        "generate",
        "--model",
        model_name(model),
        "--prompt",
        prompt,
        *size,
        "--steps",
        str(steps),
        "--guidance",
        repr(guidance),
        "--seed",
        str(seed),
        "--num-images",
        "1",
        "--dtype",
        dtype,
    ]
    if negative is not None:
        parts += ["--negative", negative]
    if device is not None:
        parts += ["--device", device]
    if quantize is not None:
        parts += ["--quantize", quantize]
    if lora is not None:
        parts += ["--lora", str(Path(lora).resolve())]
        if lora_scale != 1.0:
            parts += ["--lora-scale", repr(lora_scale)]
    if fp8_compute:
        parts.append("--fp8-compute")
    if cuda_graph:
        parts.append("--cuda-graph")
    parts += cache_flags(cache)
    return shlex.join(parts + ["--out", "OUT"])
