"""`nucleus data curate INPUT... --out DIR`: curate images with captions into a new manifest version.

nucleus data curate photos/ --out dataset/
nucleus data curate photos/ shards/000.tar table.parquet --out dataset/ --engine local --config curate.toml
nucleus data curate photos/ --out dataset/ --aesthetic-model models/clip-l14 --clip-model models/clip-l14 --captioner-model models/llava
"""

from __future__ import annotations

import dataclasses
import json

from nucleus_image.data.curate import CurateConfig, curate
from nucleus_image.data.curate.stats import format_report


def register(subparsers) -> None:
    p = subparsers.add_parser("curate", help="validate, deduplicate, score, tier and bucket images into a manifest")
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="folders (images + .txt/.json captions), WebDataset .tar shards, or .parquet tables",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="dataset folder; a new manifest-vNNNN is added")
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="where the work runs: local processes or a Ray cluster",
    )
    p.add_argument("--config", metavar="FILE", help="a .toml or .json CurateConfig (fields override --preset)")
    p.add_argument("--preset", default=None, help="named config preset: recipe (default) or lenient")
    p.add_argument("--workers", type=int, default=None, help="local engine processes (default: all cores)")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start Ray locally)")
    p.add_argument(
        "--aesthetic-model",
        metavar="DIR",
        help="quality.model: a CLIP / SigLIP folder with aesthetic_head.safetensors; its score sets the tiers",
    )
    p.add_argument(
        "--clip-model",
        metavar="DIR",
        help="captions.model: a CLIP / SigLIP folder; image-text similarity scores captions",
    )
    p.add_argument(
        "--captioner-model",
        metavar="DIR",
        help="captioner.model: a vision-language model folder; writes short / medium / detailed captions",
    )
    p.add_argument(
        "--captioner-when",
        choices=("needed", "always"),
        default=None,
        help="caption only images with no usable caption (needed, the default) or every image",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.config and args.preset:
        raise ValueError("give --preset or --config (a config file may name its own `preset`), not both")
    cfg = CurateConfig.from_file(args.config) if args.config else CurateConfig.preset(args.preset or "recipe")
    overrides = {k: v for k, v in (("workers", args.workers), ("ray_address", args.ray_address)) if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    models = {
        "quality": {"model": args.aesthetic_model},
        "captions": {"model": args.clip_model},
        "captioner": {"model": args.captioner_model, "when": args.captioner_when},
    }
    for table, fields in models.items():
        given = {k: v for k, v in fields.items() if v is not None}
        if given:
            cfg = dataclasses.replace(cfg, **{table: dataclasses.replace(getattr(cfg, table), **given)})
    result = curate(args.inputs, args.out, cfg, engine=args.engine, progress=not args.quiet)
    if result.units_resumed:
        print(f"resumed: {result.units_resumed} of {result.units} work units were already complete")
    print(f"wrote {result.version_dir}")
    print(format_report(json.loads((result.version_dir / "stats.json").read_text())))
    return 0
