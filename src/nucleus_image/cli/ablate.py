"""`nucleus ablate ...`: controlled comparisons that train several arms of one recipe.

    nucleus ablate routing --data data/synth --out runs/ablate
    nucleus ablate routing --data data/synth --out runs/ablate-short --max-steps 300 --no-fid --sequential
    nucleus ablate claims --claim routing,capacity --data data/synth --out runs/claims --seeds 0,1,2 --steps 300,200
    nucleus ablate claims --claim routing,capacity --out runs/claims --seeds 0,1,2 --report-only --write-doc docs/claims.md

`routing`: the decoupled-routing ablation (`nucleus_image.eval.ablation`): the preset trained twice, identical
except model.router_input (decoupled vs coupled), same seed, data and steps; then final loss, compositional score
per task, FID and the routing metrics side by side in OUT/ablation.md and OUT/ablation.json, with pictures.

`claims`: the announcement's claims in miniature (`nucleus_image.eval.claims`): per claim, the preset against its
alternatives over several seeds, each with the paired difference to the control, its 95% interval and a verdict,
in OUT/<claim>/claim.md, claim.json and claim.png; --write-doc gathers every claim under OUT into one document.
"""

from __future__ import annotations

import functools
import shlex

from nucleus_image.cli.arguments import EVAL_STEPS, add_overrides_arg, add_threads_arg
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
    add_overrides_arg(p, "config override applied to both arms; repeatable")
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
    register_claims(sub)


def register_claims(sub) -> None:
    from nucleus_image.eval.claims import CLAIMS

    p = sub.add_parser(
        "claims",
        help="reproduce the announcement's claims in miniature (several seeds, paired intervals, verdicts)",
        description="Train the tiny preset and its alternatives per claim over several seeds and compare them.",
    )
    p.add_argument("--claim", default=None, help=f"comma-separated claims (accepted: {', '.join(CLAIMS)})")
    p.add_argument("--arms", default="", help="comma-separated arms of those claims to run (default: all)")
    p.add_argument("--data", default=None, help="dataset folder (from `nucleus data synth`)")
    p.add_argument("--out", required=True, help="claims folder (re-running resumes it and adds what is missing)")
    p.add_argument("--seeds", default="0,1,2", help="training seeds, shared by every arm (default 0,1,2)")
    steps = p.add_mutually_exclusive_group()
    steps.add_argument("--max-steps", type=int, default=None, help="stop every run after this many steps")
    steps.add_argument("--steps", default=None, help="comma-separated steps per stage (default: the preset's)")
    add_overrides_arg(p, "config override applied to every arm; repeatable")
    p.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="steps between checkpoints (default: 16 checkpoints fit the last stage, at most the preset's 50)",
    )
    p.add_argument("--parallel", type=int, default=2, help="runs at a time, one thread each (default 2)")
    p.add_argument("--per-task", type=int, default=24, help="held-out prompts per task to sample and score")
    p.add_argument("--samples", type=int, default=4, help="images per held-out prompt")
    p.add_argument("--routing-per-task", type=int, default=4, help="prompts per task for the routing metrics")
    p.add_argument("--report-only", action="store_true", help="train nothing: summarise the runs under --out")
    p.add_argument("--write-doc", default=None, metavar="FILE", help="also gather every claim under --out into FILE")
    p.set_defaults(func=run_claims)


def _int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{flag} {text!r} is not a comma-separated list of integers") from None
    if not values or len(set(values)) != len(values):
        raise ValueError(f"{flag} {text!r}: give at least one value, each once")
    return values


def run_claims(args) -> int:
    from nucleus_image.eval.claims import ClaimsConfig, format_claim, report, write_doc
    from nucleus_image.eval.claims import run_claims as run

    for name in ("parallel", "per_task", "samples", "routing_per_task"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.max_steps is not None and args.max_steps < 1 or args.checkpoint_every < 0:
        raise ValueError(f"--max-steps {args.max_steps} must be >= 1 and --checkpoint-every >= 0")
    if args.claim is None and not args.write_doc:
        raise ValueError("give --claim NAME[,NAME] (or --write-doc FILE alone to gather what --out holds)")
    cfg = ClaimsConfig(
        claims=tuple(c.strip() for c in (args.claim or "").split(",") if c.strip()),
        seeds=_int_list(args.seeds, "--seeds"),
        arms=tuple(a.strip() for a in args.arms.split(",") if a.strip()),
        max_steps=args.max_steps,
        stage_steps=_int_list(args.steps, "--steps") if args.steps else (),
        overrides=tuple(args.overrides),
        checkpoint_every=args.checkpoint_every,
        parallel=args.parallel,
        per_task=args.per_task,
        samples=args.samples,
        routing_per_task=args.routing_per_task,
    )
    command = ["nucleus", "ablate", "claims", "--claim", "{claim}", "--data", args.data or "DATA", "--out", args.out]
    command += ["--seeds", args.seeds] + (["--arms", args.arms] if args.arms else [])
    command += ["--steps", args.steps] if args.steps else []
    command += ["--max-steps", str(args.max_steps)] if args.max_steps is not None else []
    for item in args.overrides:
        command += ["--set", item]
    command += ["--checkpoint-every", str(args.checkpoint_every)] if args.checkpoint_every else []
    command += ["--per-task", str(args.per_task), "--samples", str(args.samples)]
    command += ["--routing-per-task", str(args.routing_per_task)] if args.routing_per_task != 4 else []
    text = shlex.join(command).replace("'{claim}'", "{claim}")
    if args.claim is not None:
        if args.report_only:
            summaries = report(cfg, args.out, text)
        elif args.data is None:
            raise ValueError("--data is required to train (or give --report-only)")
        else:
            summaries = run(cfg, args.data, args.out, text, _check_command)
        for summary in summaries:
            print(format_claim(summary) + "\n")
        print(f"tables: {args.out}/<claim>/claim.md; pictures: {args.out}/<claim>/claim.png")
    if args.write_doc:
        print(f"wrote {write_doc(args.out, args.write_doc)}")
    return 0


def _check_command(argv: list[str]) -> None:
    """Refuse a planned `nucleus` command whose flags this version does not have (an arm needing a newer one)."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            _, extra = _parser().parse_known_args(argv)
    except SystemExit:
        raise ValueError(f"`nucleus {argv[0]}` refuses {shlex.join(argv)}: {err.getvalue().strip()}") from None
    if extra:
        raise ValueError(f"`nucleus {argv[0]}` has no {' '.join(extra)} in this version")


@functools.cache
def _parser():
    from nucleus_image.cli import build_parser

    return build_parser()


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
