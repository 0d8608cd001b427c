"""`nucleus eval compositional`: GenEval's rules on the synthetic shapes domain.

    nucleus eval compositional --images samples/ --out report/
    nucleus eval compositional --model runs/tiny/merged --out report/
    nucleus eval compositional --model runs/tiny/merged --prompts data/synth/heldout_metadata.jsonl --samples 2 --out report/

With --model, the held-out prompts (--prompts FILE, else `heldout_metadata`) are sampled first into
REPORT/images/ in GenEval's layout; an interrupted run continues where it stopped when rerun. Writes
REPORT/report.json and REPORT/detections.png and prints the per-task table.
"""

from __future__ import annotations

from pathlib import Path

from nucleus_image.cli.arguments import (
    EVAL_STEPS,
    add_threads_arg,
    check_device,
    check_guidance,
    check_out_folder,
    check_positive,
    read_prompt_file,
    resumable,
)
from nucleus_image.eval.compositional import (
    format_summary,
    generate_samples,
    read_geneval_folder,
    score_folder,
    validate_records,
    write_report,
)
from nucleus_image.timing import PhaseTimer


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "compositional",
        help="GenEval-style compositional score on the shapes domain",
        description="Score a GenEval-layout image folder, or sample a model on the held-out "
        "prompts first, with GenEval's rules and an exact shape detector.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="GenEval-layout folder: <index:05d>/metadata.jsonl + samples/<k:04d>.png")
    source.add_argument("--model", help="pipeline folder to sample (model_index.json, transformer/, ...)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="GenEval-format metadata .jsonl: prompts with their tag and "
        "objects (with --model; default: the held-out prompts)",
    )
    p.add_argument("--per-task", type=int, default=24, help="held-out prompts per task when --prompts is not given")
    p.add_argument("--samples", type=int, default=4, help="images per prompt (with --model; default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (with --model)")
    p.add_argument("--steps", type=int, default=EVAL_STEPS, help="denoising steps (with --model)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (with --model)")
    p.add_argument("--aspect", default="1:1", help="aspect preset at the model's native size (with --model)")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward, whole prompts (with --model)")
    p.add_argument("--device", default=None, help="torch device for --model (default: cuda if available)")
    add_threads_arg(p)
    p.set_defaults(func=run)


def load_records(path: str) -> list[dict]:
    """GenEval metadata records from --prompts; plain prompts are refused: scoring needs each prompt's objects."""
    records = read_prompt_file(path)
    if any("tag" not in r and "include" not in r for r in records):
        raise ValueError(
            f"--prompts {path!r} holds plain prompts; compositional scoring needs GenEval metadata per "
            f"prompt ('tag' and 'include' objects, as in heldout_metadata.jsonl)"
        )
    validate_records(records)
    return records


def prompts_per_forward(batch_size: int, samples: int) -> int:
    return max(1, batch_size // samples)


def run(args) -> int:
    out = Path(args.out)
    check_positive(args, "per_task", "samples", "steps", "batch_size")
    check_guidance(args.guidance)
    check_device(args.device)
    check_out_folder(args.out)
    if args.images and not Path(args.images).is_dir():
        raise ValueError(f"--images {args.images!r} is not a folder")
    timer = PhaseTimer()
    if args.model:
        from nucleus_image.data.synthetic import heldout_metadata
        from nucleus_image.pipeline import NucleusPipeline

        records = load_records(args.prompts) if args.prompts else heldout_metadata(0, args.per_task)
        with timer.phase("model load"):
            pipeline = NucleusPipeline.from_pretrained(args.model, device=args.device)
        with resumable(out / "images", "images"), timer.phase("sampling"):
            images_dir = generate_samples(
                pipeline,
                records,
                out / "images",
                args.samples,
                args.seed,
                args.steps,
                args.guidance,
                args.aspect,
                prompts_per_forward(args.batch_size, args.samples),
            )
    else:
        images_dir = Path(args.images)
    with timer.phase("scoring"):
        report = score_folder(images_dir)
    _, paths = read_geneval_folder(images_dir)
    with timer.phase("report"):
        path = write_report(report, out, paths)
    timer.write(out / "timing.json", images=report["images"])
    print(format_summary(report))
    print(f"report: {path}")
    return 0
