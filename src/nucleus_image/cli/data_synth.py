"""`nucleus data synth`: write the synthetic compositional dataset (shapes mirroring GenEval's six tasks).

    nucleus data synth --out data/synth --num 2000 --seed 0
    nucleus data synth --out data/heldout_real --num 500 --seed 1 --size 64 --aspects 1:1

Writes DIR/images/*.png, a new manifest version DIR/manifest-vNNNN/, DIR/heldout_metadata.jsonl (held-out
prompts in GenEval's format) and DIR/preview.png. The same seed writes byte-identical files.
"""

from __future__ import annotations

import collections
import time

from nucleus_image.data.synthetic import ASPECT_RATIOS, SynthConfig, generate_dataset


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "synth",
        help="write the synthetic compositional dataset",
        description="Coloured shapes mirroring GenEval's six tasks, with ground-truth "
        "objects, captions at four granularities and a Parquet manifest.",
    )
    p.add_argument("--out", required=True, help="dataset folder (created; older manifest versions are kept)")
    p.add_argument("--num", type=int, required=True, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0); image i depends only on (seed, i)")
    p.add_argument("--size", type=int, default=128, help="short side in pixels (default 128)")
    p.add_argument(
        "--aspects",
        default=",".join(ASPECT_RATIOS),
        help=f"comma-separated aspect ratios (default all: {','.join(ASPECT_RATIOS)})",
    )
    p.add_argument("--textured-fraction", type=float, default=0.5, help="share of textured backgrounds")
    p.add_argument("--heldout-per-task", type=int, default=24, help="held-out prompts per task (default 24)")
    p.add_argument(
        "--heldout-repeat",
        action="store_true",
        help="tasks with fewer combinations than --heldout-per-task repeat them (whole rounds), so each "
        "task gets about as many scored images (for intervals of equal width)",
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from nucleus_image.cli.arguments import check_out_folder, check_positive

    check_positive(args, "num", "size", "heldout_per_task")
    check_out_folder(args.out)
    if not 0.0 <= args.textured_fraction <= 1.0:
        raise ValueError(f"--textured-fraction must be in [0, 1], got {args.textured_fraction}")
    config = SynthConfig(
        size=args.size,
        aspect_ratios=tuple(a.strip() for a in args.aspects.split(",") if a.strip()),
        textured_fraction=args.textured_fraction,
    )
    start = time.perf_counter()
    version_dir = generate_dataset(
        args.out,
        args.num,
        args.seed,
        config,
        heldout_per_task=args.heldout_per_task,
        heldout_repeat=args.heldout_repeat,
    )
    import pyarrow.parquet as pq

    table = pq.read_table(version_dir)
    buckets = collections.Counter(table.column("bucket").to_pylist())
    print(f"wrote {args.num} images in {time.perf_counter() - start:.1f}s to {args.out}/images")
    print(
        f"manifest: {version_dir}  held-out prompts: {args.out}/heldout_metadata.jsonl  preview: {args.out}/preview.png"
    )
    print("bucket counts: " + ", ".join(f"B{b}={buckets[b]}" for b in sorted(buckets)))
    return 0
