"""`nucleus train`: train a Nucleus MoE transformer with the recipe (stages, Muon + AdamW, Warmup-Stable-Merge).

    nucleus train --preset tiny --data data/synth --out runs/tiny [--max-steps N] [--resume] [--set lr=3e-3 ...]
    nucleus train --config runs/old/train_config.json --data data/synth --out runs/new

Writes RUN_DIR/train_config.json (the resolved config), checkpoints/step-*/ (atomic, last N kept),
tensorboard/, samples/*.png, loss_curve.png and losses.json. `--resume` continues from the newest complete
checkpoint, reproducing the uninterrupted run exactly on CPU.

Several processes (FSDP2, expert parallelism; the layout in `parallel.*`, the global batch split over them):

    nucleus train ... --nproc 4 --set parallel.ep=2                     # one machine: starts 4 processes itself
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m nucleus_image train ... --set parallel.ep=8                  # several machines
"""

from __future__ import annotations

from pathlib import Path

from nucleus_image.parallel.config import check_layout
from nucleus_image.parallel.launch import launch
from nucleus_image.parallel.mesh import launched_world
from nucleus_image.training.config import PRESETS, TrainConfig


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a model (the recipe: stages, Muon, WSM, exact resume)",
                              description="Train a Nucleus MoE transformer on a manifest dataset.")
    p.add_argument("--preset", default="tiny", help=f"training preset (default tiny; accepted: {', '.join(PRESETS)})")
    p.add_argument("--config", default=None, help="a resolved train_config.json to start from instead of --preset")
    p.add_argument("--data", required=True, help="dataset folder holding manifest-vNNNN/ (e.g. from `nucleus data synth`)")
    p.add_argument("--out", required=True, help="run folder (created)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in total")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (dotted: lr=3e-3, stages.0.steps=200, model.num_experts=16); repeatable")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes to start on this machine (torchrun standalone; gloo on CPU, nccl on GPU)")
    p.set_defaults(func=run)


def run(args) -> int:
    from nucleus_image.training.trainer import Trainer

    out = Path(args.out)
    if args.resume and (out / "train_config.json").exists():
        cfg = TrainConfig.from_json(out / "train_config.json").override(args.overrides)
    elif args.config:
        if not Path(args.config).is_file():
            raise ValueError(f"--config {args.config!r} does not exist")
        cfg = TrainConfig.from_json(args.config).override(args.overrides)
    else:
        cfg = TrainConfig.preset(args.preset).override(args.overrides)
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nproc > 1 and launched_world() == 1:
        # Checked here too, so a layout that cannot work fails before any process starts.
        check_layout(cfg.parallel.resolve(args.nproc), cfg.model.num_experts,
                     {s.name: s.batch_size for s in cfg.stages}, cfg.grad_accum_steps)
        return launch(args.nproc, _forwarded(args))
    Trainer(cfg, args.data, out, max_steps=args.max_steps, resume=args.resume, progress=not args.no_progress).train()
    return 0


def _forwarded(args) -> list[str]:
    """This command's arguments for each started process (without --nproc)."""
    out = ["train", "--preset", args.preset, "--data", args.data, "--out", args.out]
    if args.config:
        out += ["--config", args.config]
    if args.max_steps is not None:
        out += ["--max-steps", str(args.max_steps)]
    if args.resume:
        out.append("--resume")
    if args.no_progress:
        out.append("--no-progress")
    for item in args.overrides:
        out += ["--set", item]
    return out
