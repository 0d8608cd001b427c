"""`nucleus generate`: text to image from a pipeline folder or Hub id, one PNG and one JSON sidecar per image.

    nucleus generate --model runs/tiny/merged --prompt "a red cube left of a blue sphere" --num-images 4 --out samples/
    nucleus generate --model runs/tiny/merged --prompts prompts.txt --aspect 16:9 --steps 30 --out samples/
    nucleus generate --model NucleusAI/NucleusMoE-Image --prompt "a lighthouse at dusk" --device cuda --out samples/
    nucleus generate --model NucleusAI/NucleusMoE-Image --prompts prompts.txt --cuda-graph --fp8-compute --out samples/
    nucleus generate --model runs/tiny/merged --lora runs/distill/adapter --prompt "a red circle" --out samples/

Image k (counting over prompts, then images per prompt) is drawn with seed `--seed + k` on a CPU generator, so
every image is reproducible on its own: its sidecar and its PNG text metadata hold the exact settings and a
command that regenerates it. Work is streamed batch by batch (memory does not grow with --num-images), each file
is written atomically, and OUT/generate.json records the job: rerunning the same command after an interrupt
continues it; a different job into the same --out is refused. `--lora ADAPTER` attaches a LoRA adapter; one that
carries sampler settings (a `nucleus distill` student) sets the default --steps, --guidance and noise levels.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from nucleus_image.cli import step_cache_args
from nucleus_image.cli.arguments import (
    DTYPES,
    GENERATE_STEPS,
    add_acceleration_args,
    add_prompt_args,
    add_threads_arg,
    check_acceleration,
    check_device,
    check_guidance,
    check_out_folder,
    check_positive,
    load_pipeline,
    prompt_records,
)
from nucleus_image.pipeline.command import generate_command, model_name
from nucleus_image.pipeline.presets import ASPECT_RATIOS

# One job writes at most this many images: names are 5-digit (00000.png ...), and a larger job is better split
# over several --out folders with --seed offsets.
MAX_IMAGES = 100_000
JOB_FILE = "generate.json"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate images from text prompts",
        description="Generate images with a Nucleus pipeline (a folder in diffusers' layout, "
        "one written by our training, or a Hugging Face Hub id); writes PNGs "
        "with JSON sidecars. Rerunning an interrupted command continues it.",
    )
    p.add_argument(
        "--model",
        required=True,
        help="pipeline folder (model_index.json, transformer/, vae/, ...) or Hugging Face Hub id owner/name[@revision]",
    )
    add_prompt_args(p)
    p.add_argument("--negative", default=None, help="negative prompt applied to every prompt (default: empty)")
    p.add_argument(
        "--aspect",
        choices=ASPECT_RATIOS,
        default=None,
        help="aspect preset at the model's native size (default: square, 1:1)",
    )
    p.add_argument("--width", type=int, default=None, help="width in pixels (with --height; not with --aspect)")
    p.add_argument("--height", type=int, default=None, help="height in pixels (with --width; not with --aspect)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"denoising steps (default: {GENERATE_STEPS}); a --lora adapter with sampler settings sets its own",
    )
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale; <= 1 disables it (default: 4.0); a --lora adapter with "
        "sampler settings sets its own",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image k uses seed + k")
    p.add_argument("--num-images", type=int, default=1, help=f"images per prompt (at most {MAX_IMAGES} in all)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward (bitwise results depend on it)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument(
        "--offload-text-encoder",
        action="store_true",
        help="move the text encoder to the CPU after encoding each batch's prompts",
    )
    p.add_argument(
        "--quantize",
        choices=("int8", "fp8"),
        default=None,
        help="8-bit transformer weights, quantized while loading; the text encoder and VAE are unchanged "
        "(default: none, full precision)",
    )
    p.add_argument(
        "--lora",
        metavar="ADAPTER",
        default=None,
        help="LoRA adapter folder (peft's format, from `nucleus finetune` or `nucleus distill`); its "
        "sampler settings, if it carries any, become the default --steps and --guidance",
    )
    p.add_argument("--lora-scale", type=float, default=1.0, help="multiplier of the adapter's update")
    add_acceleration_args(p)
    p.add_argument("--out", required=True, help="output folder for PNGs and JSON sidecars")
    step_cache_args.add_arguments(p)
    add_threads_arg(p)
    p.set_defaults(func=run)


def check_args(args, prompts: list[str]) -> tuple[int, int]:
    """Everything checkable before the model loads; returns the image (height, width). Fills in args.steps and
    args.guidance (given, else the --lora adapter's, else the release's)."""
    from nucleus_image.pipeline.folder import read_geometry
    from nucleus_image.pipeline.presets import resolve_size

    check_positive(args, "steps", "num_images", "batch_size")
    args.guidance, args.steps, _ = sampler_defaults(args.lora).resolve(args.guidance, args.steps, None)
    check_guidance(args.guidance)
    check_guidance(args.lora_scale, "--lora-scale")
    if len(prompts) * args.num_images > MAX_IMAGES:
        raise ValueError(
            f"--num-images {args.num_images} x {len(prompts)} prompt(s) = "
            f"{len(prompts) * args.num_images} images; one run writes at most {MAX_IMAGES} (split the "
            f"job over several --out folders, each with its own --seed)"
        )
    if (args.width is None) != (args.height is None) and args.aspect is None:
        raise ValueError("pass both --width and --height (or --aspect)")
    check_device(args.device)
    check_acceleration(args)
    check_out_folder(args.out)
    sample_size, granularity = read_geometry(args.model)  # also refuses a folder that is not a pipeline
    try:
        return resolve_size(args.height, args.width, args.aspect, sample_size, granularity)
    except ValueError as err:
        raise ValueError(
            str(err).replace("aspect_ratio", "--aspect").replace("height/width", "--width/--height")
        ) from None


def sampler_defaults(lora: str | None):
    """The sampler settings of the --lora adapter (read from its config, before any model loads), else the
    release's defaults."""
    from nucleus_image.diffusion.sampler_settings import SamplerSettings

    if lora is None:
        return SamplerSettings(num_inference_steps=GENERATE_STEPS)
    from nucleus_image.adapters import read_sampler_settings

    try:
        return read_sampler_settings(lora) or SamplerSettings(num_inference_steps=GENERATE_STEPS)
    except FileNotFoundError as err:
        raise ValueError(f"--lora {lora!r}: {err}") from None


def lora_record(args) -> dict | None:
    """What identifies the adapter of a job: its absolute path, the hash of its weights and the scale."""
    if args.lora is None:
        return None
    folder = Path(args.lora).resolve()
    weights = sorted(folder.glob("adapter_model.*"))
    if not weights:
        raise ValueError(f"--lora {args.lora!r} holds no adapter_model.safetensors")
    return {
        "path": str(folder),
        "sha256": hashlib.sha256(weights[0].read_bytes()).hexdigest(),
        "scale": args.lora_scale,
    }


def claim_folder(out: Path, job: dict) -> set[int]:
    """The image numbers already written by this same job; refuses a folder holding another job or other files."""
    job_file = out / JOB_FILE
    if job_file.exists():
        saved = json.loads(job_file.read_text())
        diff = sorted(k for k in set(saved) | set(job) if saved.get(k) != job.get(k))
        if diff:
            raise ValueError(
                f"--out {str(out)!r} holds another generate job (different {', '.join(diff)}); rerun "
                f"that job's command to continue it, or choose a new --out"
            )
    elif out.is_dir() and any(out.glob("*.png")):
        raise ValueError(f"--out {str(out)!r} already holds PNGs from another run; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(job_file, (json.dumps(job, indent=2) + "\n").encode())
    return {int(p.stem) for p in out.glob("[0-9]*.json") if p.stem.isdigit() and p.with_suffix(".png").exists()}


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def png_bytes(image, sidecar: dict) -> bytes:
    """The PNG with its settings as text chunks: `parameters` in the layout common UIs read, and the sidecar."""
    import io

    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    lines = [sidecar["prompt"]]
    if sidecar["negative_prompt"]:
        lines.append(f"Negative prompt: {sidecar['negative_prompt']}")
    lines.append(
        f"Steps: {sidecar['num_inference_steps']}, Sampler: flow-match Euler, CFG scale: "
        f"{sidecar['guidance_scale']}, Seed: {sidecar['seed']}, Size: {sidecar['width']}x{sidecar['height']}, "
        f"Model: {sidecar['model']}, Version: nucleus-image {sidecar['nucleus_image_version']}"
    )
    info.add_text("parameters", "\n".join(lines))
    # Without the file name: the sidecar's command, which writes 00000.png, then makes the same bytes.
    info.add_itxt("nucleus_image", json.dumps({k: v for k, v in sidecar.items() if k != "image"}))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def run(args) -> int:
    prompts = [record["prompt"] for record in prompt_records(args)]
    height, width = check_args(args, prompts)
    cache = step_cache_args.from_args(args)
    out = Path(args.out)
    total = len(prompts) * args.num_images
    job = {
        "model": model_name(args.model),
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
        "prompts": len(prompts),
        "num_images": args.num_images,
        "seed": args.seed,
        "negative_prompt": args.negative,
        "width": width,
        "height": height,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "batch_size": args.batch_size,
        "device": args.device,
        "dtype": args.dtype,
        "quantize": args.quantize,
        "cache": cache.to_dict() if cache else None,
    }
    # Recorded only when on, so jobs written before these flags existed still continue.
    job.update({name: True for name in ("fp8_compute", "cuda_graph") if getattr(args, name)})
    if args.lora is not None:
        job["lora"] = lora_record(args)
    done = claim_folder(out, job)
    if len(done) >= total:
        print(f"nothing to do: all {total} images are already in {out}", file=sys.stderr)
        return 0
    if done:
        print(f"continuing: {len(done)} of {total} images already in {out}", file=sys.stderr)

    import torch

    import nucleus_image
    from nucleus_image.progress import progress as progress_bar

    pipe = load_pipeline(args)
    _, _, sigma_list = pipe.sampler_defaults.resolve(args.guidance, args.steps, None)
    sigmas = pipe.schedule.sigmas(args.steps, (height // pipe.granularity) * (width // pipe.granularity), sigma_list)
    settings = {
        "model": job["model"],
        "negative_prompt": args.negative,
        "width": width,
        "height": height,
        "aspect_ratio": args.aspect,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "sigmas": [round(float(s), 8) for s in sigmas],
        "schedule": pipe.schedule.to_config(),
        "generator": "torch.Generator('cpu').manual_seed(seed), float32 noise",
        "device": str(pipe.device),
        "dtype": str(pipe.transformer.dtype).removeprefix("torch."),
        "quantize": pipe.transformer.quantization,
        "fp8_compute": pipe.fp8_compute,
        "cuda_graph": pipe.cuda_graph,
        "lora": job.get("lora"),
        "nucleus_image_version": nucleus_image.__version__,
        "torch_version": torch.__version__,
    }
    written = 0
    try:
        with progress_bar(total=total, initial=len(done), desc="images", unit="img") as bar:
            for start in range(0, total, args.batch_size):
                # A batch is redrawn whole when any image of it is missing: images depend on the batch they were
                # drawn in, so a continued job equals an uninterrupted one.
                numbers = range(start, min(start + args.batch_size, total))
                if all(k in done for k in numbers):
                    continue
                output = pipe(
                    prompt=[prompts[k // args.num_images] for k in numbers],
                    negative_prompt=args.negative,
                    guidance_scale=args.guidance,
                    height=height,
                    width=width,
                    num_inference_steps=args.steps,
                    generator=[torch.Generator("cpu").manual_seed(args.seed + k) for k in numbers],
                    offload_text_encoder=args.offload_text_encoder,
                    progress=False,
                    cache=cache,
                )
                reports = output.step_cache or [None] * len(numbers)
                for k, image, report in zip(numbers, output.images, reports):
                    if k in done:
                        continue
                    prompt, seed, stem = prompts[k // args.num_images], args.seed + k, out / f"{k:05d}"
                    # batch_size: the batch this image was drawn in (images depend on it: float summation order).
                    command = generate_command(
                        args.model,
                        prompt,
                        seed=seed,
                        width=width,
                        height=height,
                        steps=args.steps,
                        guidance=args.guidance,
                        negative=args.negative,
                        dtype=args.dtype,
                        device=args.device,
                        quantize=args.quantize,
                        cache=cache,
                        cuda_graph=args.cuda_graph,
                        fp8_compute=args.fp8_compute,
                        aspect=getattr(args, "aspect", None),
                        lora=args.lora,
                        lora_scale=args.lora_scale,
                    )
                    sidecar = {
                        "image": stem.with_suffix(".png").name,
                        "prompt": prompt,
                        "seed": seed,
                        **settings,
                        "batch_size": len(numbers),
                        "step_cache": report,
                        "command": command,
                    }
                    write_atomic(stem.with_suffix(".png"), png_bytes(image, sidecar))
                    write_atomic(stem.with_suffix(".json"), (json.dumps(sidecar, indent=2) + "\n").encode())
                    done.add(k)
                    written += 1
                    bar.update(1)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"{written} new images written, {len(done)} of {total} in {out}; rerun the same command to continue"
        ) from None
    print(f"wrote {written} images to {out} ({total} in the job)", file=sys.stderr)
    return 0
