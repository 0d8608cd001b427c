"""`nucleus generate`: text to image from a pipeline folder, one PNG and one JSON sidecar per image.

    nucleus generate --model runs/tiny/pipeline --prompt "a red cube left of a blue sphere" --num-images 4 --out samples/

Image k (counting over prompts, then images per prompt) is drawn with seed `--seed + k` on a CPU generator, so
every image is reproducible on its own: its sidecar holds the exact settings and a command that regenerates it.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from nucleus_image.cli import step_cache_args
from nucleus_image.pipeline.presets import ASPECT_RATIOS

DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate images from text prompts",
                              description="Generate images with a Nucleus pipeline folder (diffusers layout or one "
                                          "written by our training); writes PNGs with JSON sidecars.")
    p.add_argument("--model", required=True, help="pipeline folder (model_index.json, transformer/, vae/, ...)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for several")
    p.add_argument("--prompts-file", help="prompts, one per line, or .jsonl objects with a 'prompt' key")
    p.add_argument("--negative", default=None, help="negative prompt applied to every prompt (default: empty)")
    p.add_argument("--aspect", choices=ASPECT_RATIOS, default=None, help="aspect preset at the model's native size")
    p.add_argument("--width", type=int, default=None, help="width in pixels (with --height; not with --aspect)")
    p.add_argument("--height", type=int, default=None, help="height in pixels (with --width; not with --aspect)")
    p.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale; <= 1 disables it")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (bitwise results depend on it)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--offload-text-encoder", action="store_true", help="move the text encoder to the CPU after "
                                                                       "encoding each batch's prompts")
    p.add_argument("--out", required=True, help="output folder for PNGs and JSON sidecars")
    step_cache_args.add_arguments(p)
    p.set_defaults(func=run)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise ValueError(f"--prompts-file {str(path)!r} does not exist")
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            for number, line in enumerate(lines, 1):
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                    raise ValueError(f"{path}:{number} has no string 'prompt' field")
                prompts.append(record["prompt"])
        else:
            prompts.extend(line.strip() for line in lines)
    if not prompts:
        raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE with at least one prompt")
    return prompts


def check_args(args) -> tuple[int, int]:
    """Everything checkable before the model loads; returns the image (height, width)."""
    from nucleus_image.pipeline.folder import read_geometry
    from nucleus_image.pipeline.presets import resolve_size

    for name in ("steps", "num_images", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if (args.width is None) != (args.height is None) and args.aspect is None:
        raise ValueError("pass both --width and --height (or --aspect)")
    sample_size, granularity = read_geometry(args.model)  # also refuses a folder that is not a pipeline
    try:
        return resolve_size(args.height, args.width, args.aspect, sample_size, granularity)
    except ValueError as err:
        raise ValueError(str(err).replace("aspect_ratio", "--aspect").replace("height/width", "--width/--height")) \
            from None


def reproduce_command(args, prompt: str, seed: int, width: int, height: int) -> str:
    parts = ["nucleus", "generate", "--model", str(Path(args.model).resolve()), "--prompt", prompt,
             "--width", str(width), "--height", str(height), "--steps", str(args.steps), "--guidance",
             repr(args.guidance), "--seed", str(seed), "--num-images", "1", "--dtype", args.dtype]
    if args.negative is not None:
        parts += ["--negative", args.negative]
    if args.device is not None:
        parts += ["--device", args.device]
    parts += step_cache_args.command_args(step_cache_args.from_args(args))
    return shlex.join(parts + ["--out", "OUT"])


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    import nucleus_image
    from nucleus_image.pipeline import NucleusPipeline

    prompts = read_prompts(args)
    height, width = check_args(args)
    cache = step_cache_args.from_args(args)
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    pipe = NucleusPipeline.from_pretrained(args.model, dtype=dtype, device=args.device)
    sigmas = pipe.schedule.sigmas(args.steps, (height // pipe.granularity) * (width // pipe.granularity))

    jobs = [(prompt, args.seed + k) for k, prompt in enumerate(p for p in prompts for _ in range(args.num_images))]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": str(Path(args.model).resolve()),
        "negative_prompt": args.negative,
        "width": width,
        "height": height,
        "aspect_ratio": args.aspect,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "sigmas": [round(float(s), 8) for s in sigmas],
        "schedule": pipe.schedule.to_config(),
        "generator": "torch.Generator('cpu').manual_seed(seed), float32 noise",
        "batch_size": args.batch_size,
        "device": str(pipe.device),
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "nucleus_image_version": nucleus_image.__version__,
        "torch_version": torch.__version__,
    }
    with tqdm(total=len(jobs), desc="images", unit="img") as bar:
        for start in range(0, len(jobs), args.batch_size):
            batch = jobs[start:start + args.batch_size]
            output = pipe(
                prompt=[prompt for prompt, _ in batch],
                negative_prompt=args.negative,
                guidance_scale=args.guidance,
                height=height,
                width=width,
                num_inference_steps=args.steps,
                generator=[torch.Generator("cpu").manual_seed(seed) for _, seed in batch],
                offload_text_encoder=args.offload_text_encoder,
                progress=False,
                cache=cache,
            )
            reports = output.step_cache or [None] * len(batch)
            for k, ((prompt, seed), image, report) in enumerate(zip(batch, output.images, reports), start):
                stem = out / f"{k:05d}"
                image.save(stem.with_suffix(".png"))
                sidecar = {"image": stem.with_suffix(".png").name, "prompt": prompt, "seed": seed, **settings,
                           "step_cache": report, "command": reproduce_command(args, prompt, seed, width, height)}
                stem.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
            bar.update(len(batch))
    print(f"wrote {len(jobs)} images to {out}", file=sys.stderr)
    return 0
