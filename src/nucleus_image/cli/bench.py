"""`nucleus bench ...`: benchmark runners.

    nucleus bench geneval --model runs/tiny/merged --out geneval/
    nucleus bench geneval --model NucleusAI/NucleusMoE-Image --out geneval/ --device cuda --limit 20

`geneval` (`nucleus_image.eval.geneval_bench`): the 553 GenEval prompts, 4 images each by default, in the layout
GenEval's official scorer reads (score them there with its detector), seeds recorded, resumable. A synthetic-domain
model gets the synthetic held-out prompts by default and is scored here with the compositional scorer
(OUT/report.json, OUT/detections.png).
"""

from __future__ import annotations

from nucleus_image.cli.arguments import GENERATE_STEPS, add_threads_arg


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmark runners (geneval)")
    sub = parser.add_subparsers(dest="bench_command", required=True)
    p = sub.add_parser(
        "geneval",
        help="sample the GenEval prompts in GenEval's folder layout (resumable)",
        description="Generate GenEval's prompts for its official scorer; score synthetic models here.",
    )
    p.add_argument("--model", required=True, help="pipeline folder (model_index.json, transformer/, ...)")
    p.add_argument("--out", required=True, help="output folder (GenEval layout); re-running resumes it")
    p.add_argument(
        "--prompts",
        help="GenEval-format metadata .jsonl (default: GenEval's 553 prompts; for a "
        "synthetic-domain model, the synthetic held-out prompts)",
    )
    p.add_argument("--per-task", type=int, default=24, help="synthetic held-out prompts per task (synthetic default)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (default: all)")
    p.add_argument("--samples", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of image 0 of prompt 0 (default 0)")
    p.add_argument("--steps", type=int, default=GENERATE_STEPS, help="denoising steps")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (default 4.0)")
    p.add_argument("--aspect", default="1:1", help="aspect preset at the model's native size (default 1:1)")
    p.add_argument("--batch-size", type=int, default=8, help="images per pipeline call")
    p.add_argument(
        "--score",
        choices=("auto", "compositional", "none"),
        default="auto",
        help="auto: score with the compositional scorer when the prompts are synthetic shapes",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from nucleus_image.cli.arguments import check_device, check_guidance, check_out_folder, check_positive, resumable

    check_positive(args, "per_task", "samples", "steps", "batch_size")
    check_guidance(args.guidance)
    check_device(args.device)
    check_out_folder(args.out)

    from nucleus_image.eval.geneval_bench import generate_benchmark, is_synthetic_domain, read_prompts, scorable_here

    synthetic = is_synthetic_domain(args.model)
    if args.prompts:
        records, source = read_prompts(args.prompts), args.prompts
    elif synthetic:
        from nucleus_image.data.synthetic import heldout_metadata

        records, source = heldout_metadata(0, args.per_task), f"synthetic held-out prompts ({args.per_task} per task)"
        print("synthetic-domain model: sampling the synthetic held-out prompts (pass --prompts to override)")
    else:
        records, source = read_prompts(), "GenEval evaluation_metadata.jsonl (553 prompts)"
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit {args.limit} must be >= 1")
        records = records[: args.limit]
    score = args.score == "compositional" or (args.score == "auto" and scorable_here(records))
    if args.score == "compositional" and not scorable_here(records):
        raise ValueError(
            "--score compositional needs prompts over the synthetic shapes; these name other classes "
            "(score GenEval's COCO prompts with GenEval's own detector)"
        )

    from nucleus_image.pipeline import NucleusPipeline

    pipeline = NucleusPipeline.from_pretrained(args.model, device=args.device)
    settings = {"model": str(Path(args.model).resolve()), "prompts": source, "aspect": args.aspect}
    with resumable(args.out, "images"):
        result = generate_benchmark(
            pipeline,
            records,
            args.out,
            settings,
            args.samples,
            args.seed,
            args.steps,
            args.guidance,
            args.batch_size,
            args.aspect,
        )
    print(
        f"{result['written']} images written, {result['skipped_existing']} already there; {result['total']} in "
        f"{args.out} (GenEval layout)"
    )
    if score:
        from nucleus_image.eval.compositional import format_summary, read_geneval_folder, score_folder, write_report

        report = score_folder(args.out)
        path = write_report(report, args.out, read_geneval_folder(args.out)[1])
        print(format_summary(report))
        print(f"report: {path}")
    else:
        print("score with GenEval's evaluate_images.py on this folder (its detector is not bundled here)")
    return 0
