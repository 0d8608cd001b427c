"""`nucleus eval compositional`: GenEval's rules on the synthetic shapes domain.

    nucleus eval compositional --images samples/ --out report/        # score a GenEval-layout folder
    nucleus eval compositional --model runs/tiny/pipeline --out report/ [--samples 4 --steps 20]

With --model, the held-out prompts (--prompts FILE, else `heldout_metadata`) are sampled first into
REPORT/images/ in GenEval's layout. Writes REPORT/report.json and REPORT/detections.png and prints the
per-task table.
"""

from __future__ import annotations

import json
from pathlib import Path

from nucleus_image.eval.compositional import (format_summary, generate_samples, read_geneval_folder,
                                              score_folder, validate_records, write_report)


def register(subparsers) -> None:
    p = subparsers.add_parser("compositional", help="GenEval-style compositional score on the shapes domain",
                              description="Score a GenEval-layout image folder, or sample a model on the held-out "
                                          "prompts first, with GenEval's rules and an exact shape detector.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="GenEval-layout folder: <index:05d>/metadata.jsonl + samples/<k:04d>.png")
    source.add_argument("--model", help="pipeline folder to sample (model_index.json, transformer/, ...)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--prompts", help="GenEval-format metadata .jsonl (with --model; default: held-out prompts)")
    p.add_argument("--per-task", type=int, default=24, help="held-out prompts per task when --prompts is not given")
    p.add_argument("--samples", type=int, default=4, help="images per prompt (with --model; default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (with --model)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (with --model; default 20)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (with --model)")
    p.add_argument("--aspect", default="1:1", help="aspect preset at the model's native size (with --model)")
    p.add_argument("--batch-prompts", type=int, default=4, help="prompts per forward (with --model)")
    p.add_argument("--device", default=None, help="torch device for --model (default: cuda if available)")
    p.set_defaults(func=run)


def load_records(path: str) -> list[dict]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"--prompts {path!r} does not exist")
    records = []
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not JSON: {err}") from err
    validate_records(records)
    return records


def run(args) -> int:
    out = Path(args.out)
    if args.model:
        from nucleus_image.data.synthetic import heldout_metadata
        from nucleus_image.pipeline import NucleusPipeline

        records = load_records(args.prompts) if args.prompts else heldout_metadata(0, args.per_task)
        pipeline = NucleusPipeline.from_pretrained(args.model, device=args.device)
        images_dir = generate_samples(pipeline, records, out / "images", args.samples, args.seed, args.steps,
                                      args.guidance, args.aspect, args.batch_prompts)
    else:
        images_dir = Path(args.images)
    report = score_folder(images_dir)
    _, paths = read_geneval_folder(images_dir)
    path = write_report(report, out, paths)
    print(format_summary(report))
    print(f"report: {path}")
    return 0
