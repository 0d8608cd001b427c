"""`nucleus ablate ...`: controlled comparisons that train several arms of one recipe.

    nucleus ablate routing --data data/synth --out runs/ablate
    nucleus ablate routing --data data/synth --out runs/ablate-short --max-steps 300 --no-fid --sequential

`routing`: the decoupled-routing ablation (`nucleus_image.eval.ablation`): the preset trained twice, identical
except model.router_input (decoupled vs coupled), same seed, data and steps; then final loss, compositional score
per task, FID and the routing metrics side by side in OUT/ablation.md and OUT/ablation.json, with pictures.
"""

from __future__ import annotations

from nucleus_image.cli.arguments import EVAL_STEPS, add_threads_arg
from nucleus_image.eval.routing import DEFAULT_SIGMAS


def register(subparsers) -> None:
    parser = subparsers.add_parser("ablate", help="controlled ablations (routing: decoupled vs coupled router input)")
    sub = parser.add_subparsers(dest="ablate_command", required=True)
    p = sub.add_parser(
        "routing",
        help="train decoupled and coupled routing arms and compare them",
        description="Train the preset twice, identical except the router input, and compare.",
    )
    p.add_argument("--data", required=True, help="dataset folder (from `nucleus data synth`)")
    p.add_argument("--out", required=True, help="ablation folder (re-running resumes it)")
    p.add_argument("--preset", default="tiny", help="training preset for both arms (default tiny)")
    p.add_argument("--config", default=None, help="a train_config.json for both arms instead of --preset")
    p.add_argument("--seed", type=int, default=0, help="training seed of both arms (default 0)")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop both arms after this many steps (default: the preset's stages)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied to both arms; repeatable",
    )
    p.add_argument(
        "--sequential", action="store_true", help="train the arms one after the other (default: in parallel)"
    )
    p.add_argument("--per-task", type=int, default=24, help="held-out prompts per task to sample and score")
    p.add_argument("--samples", type=int, default=4, help="images per held-out prompt")
    p.add_argument("--steps", type=int, default=EVAL_STEPS, help="denoising steps when sampling")
    p.add_argument("--guidance", type=float, default=4.0, help="classifier-free guidance scale when sampling")
    p.add_argument("--routing-per-task", type=int, default=4, help="prompts per task for the routing metrics")
    p.add_argument(
        "--sigmas", default=",".join(str(s) for s in DEFAULT_SIGMAS), help="noise levels for the routing metrics"
    )
    p.add_argument("--no-fid", action="store_true", help="skip FID against held-out renderings")
    p.add_argument("--device", default="cpu", help="torch device for the evaluation (default cpu)")
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from nucleus_image.cli.inspect_routing import parse_sigmas
    from nucleus_image.eval.ablation import AblationConfig, format_table, run_ablation
    from nucleus_image.training.config import PRESETS

    if args.config is None and args.preset not in PRESETS:
        raise ValueError(f"unknown training preset {args.preset!r}; accepted: {', '.join(PRESETS)}")
    if args.config is not None and not Path(args.config).is_file():
        raise ValueError(f"--config {args.config!r} does not exist")
    if any(o.split("=", 1)[0] in ("model.router_input", "seed") for o in args.overrides):
        raise ValueError("--set may not change model.router_input or seed: the ablation sets them (use --seed)")
    for name in ("per_task", "samples", "steps", "routing_per_task"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    cfg = AblationConfig(
        preset=args.preset,
        config=args.config,
        seed=args.seed,
        max_steps=args.max_steps,
        overrides=tuple(args.overrides),
        parallel=not args.sequential,
        per_task=args.per_task,
        samples=args.samples,
        sample_steps=args.steps,
        guidance=args.guidance,
        routing_per_task=args.routing_per_task,
        sigmas=tuple(parse_sigmas(args.sigmas)),
        fid=not args.no_fid,
        device=args.device,
        threads=args.threads_used,
    )
    summary = run_ablation(cfg, args.data, args.out)
    print(format_table(summary))
    print(
        f"table: {args.out}/ablation.md; pictures: {args.out}/loss_curves.png, "
        f"{args.out}/expert_load_side_by_side.png, {args.out}/expert_map_side_by_side.png"
    )
    return 0
