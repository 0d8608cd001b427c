"""`nucleus train`: train a Nucleus MoE transformer with the recipe (stages, Muon + AdamW, Warmup-Stable-Merge).

    nucleus train --preset tiny --data data/synth --out runs/tiny
    nucleus train --preset tiny --data data/synth --out runs/tiny --resume
    nucleus train --preset tiny --data data/synth --out runs/short --max-steps 200 --set optimizer.lr=3e-3
    nucleus train --config runs/old/train_config.json --data data/synth --out runs/new

Writes RUN_DIR/train_config.json (the resolved config), checkpoints/step-*/ (atomic, last N kept),
tensorboard/ (`tensorboard --logdir RUN_DIR/tensorboard`), samples/*.png, loss_curve.png and losses.json.
Ctrl-C or SIGTERM stops at the next step boundary, saves a checkpoint and prints the command that resumes; a
second Ctrl-C stops at once (the newest checkpoint on disk stays intact). `--resume` continues from the newest
complete checkpoint and reproduces the uninterrupted run bit for bit on CPU (same machine, same thread count).

Several processes (FSDP2, expert parallelism; the layout in `parallel.*`, the global batch split over them):

    nucleus train ... --nproc 4 --set parallel.ep=2                     # one machine: starts 4 processes itself
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m nucleus_image train ... --set parallel.ep=8                  # several machines
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

from nucleus_image.cli.arguments import add_overrides_arg, add_threads_arg
from nucleus_image.parallel.config import check_layout
from nucleus_image.parallel.launch import launch
from nucleus_image.parallel.mesh import launched_world
from nucleus_image.threads import THREAD_ENV, default_threads
from nucleus_image.training.config import PRESETS, TrainConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model (the recipe: stages, Muon, WSM, exact resume)",
        description="Train a Nucleus MoE transformer on a manifest dataset.",
    )
    p.add_argument("--preset", default="tiny", help=f"training preset (default tiny; accepted: {', '.join(PRESETS)})")
    p.add_argument("--config", default=None, help="a resolved train_config.json to start from instead of --preset")
    p.add_argument(
        "--data", required=True, help="dataset folder holding manifest-vNNNN/ (e.g. from `nucleus data synth`)"
    )
    p.add_argument("--out", required=True, help="run folder (created)")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many optimizer steps in total (default: the config's stages)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    add_overrides_arg(
        p,
        "override a config field (dotted: optimizer.lr=3e-3, stages.0.steps=200, model.num_experts=16; "
        "the optimizer's old flat names such as lr=3e-3 still work); repeatable",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes to start on this machine (torchrun standalone; gloo on CPU, nccl on GPU)",
    )
    add_threads_arg(p)
    p.set_defaults(func=run)


def resume_command(argv: list[str]) -> str:
    return shlex.join(["nucleus", *argv, *([] if "--resume" in argv else ["--resume"])])


def describe_plan(cfg: TrainConfig, data: str, max_steps: int | None) -> None:
    """Dataset size and planned steps, before the slow setup; a dataset smaller than a batch is worth a warning."""
    from nucleus_image.data.manifest import latest_version_dir, read_manifest

    rows = read_manifest(data).num_rows
    steps = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
    stages = ", ".join(f"{s.name}: {s.steps} x batch {s.batch_size}" for s in cfg.stages)
    print(
        f"dataset: {rows} images ({latest_version_dir(data)}); planned: {steps} steps of {cfg.total_steps} ({stages})"
    )
    largest = max(s.batch_size for s in cfg.stages)
    if rows < largest:
        print(
            f"warning: the dataset ({rows} images) is smaller than a batch ({largest}): every batch repeats images",
            file=sys.stderr,
        )


def run(args) -> int:
    from nucleus_image.training import checkpoint as ckpt
    from nucleus_image.training.trainer import Trainer

    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} is a file; give a run folder")
    has_config = (out / "train_config.json").exists()
    if args.resume and ckpt.latest_checkpoint(out) is None:
        raise ValueError(
            f"--resume: {args.out!r} holds no checkpoint to resume from; run without --resume to start "
            f"a fresh run there"
        )
    if not args.resume and has_config and ckpt.latest_checkpoint(out) is None:
        # An earlier start stopped before its first checkpoint: nothing to lose, so this start begins afresh.
        print(f"starting afresh: {args.out!r} holds a run config but no checkpoint", file=sys.stderr)
        (out / "train_config.json").unlink()
        has_config = False
    if args.resume and has_config:
        cfg = TrainConfig.from_json(out / "train_config.json").override(args.overrides)
    elif args.config:
        if not Path(args.config).is_file():
            raise ValueError(f"--config {args.config!r} does not exist")
        cfg = TrainConfig.from_json(args.config).override(args.overrides)
    else:
        if args.preset not in PRESETS:
            raise ValueError(f"--preset {args.preset!r} is not a training preset; accepted: {', '.join(PRESETS)}")
        cfg = TrainConfig.preset(args.preset).override(args.overrides)
    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    world = launched_world()
    if args.nproc == 1 and world == 1:
        check_one_process_layout(cfg, args.overrides)
    if args.threads is not None:  # --threads is `--set cpu_threads=N` (recorded, so --resume keeps it)
        cfg = cfg.override([f"cpu_threads={max(1, args.threads // args.nproc)}"])
    if args.nproc > 1 and world == 1:
        # Checked here too, so a layout that cannot work fails before any process starts.
        check_layout(
            cfg.parallel.resolve(args.nproc),
            cfg.model.num_experts,
            {s.name: s.batch_size for s in cfg.stages},
            cfg.grad_accum_steps,
        )
        # The cores are shared by the processes: each gets its share (torchrun passes OMP_NUM_THREADS on).
        os.environ[THREAD_ENV] = str(max(1, args.threads_used // args.nproc))
        code = launch(args.nproc, _forwarded(args))
        if code == 130:
            print(f"interrupted; resume with: {resume_command(args.argv)}", file=sys.stderr)
        return code
    describe_plan(cfg, args.data, args.max_steps)
    if cfg.cpu_threads:
        print(f"threads: {cfg.cpu_threads} per process (cpu_threads)")
    else:
        print(f"threads: {args.threads_used} per process ({default_threads()[1]}; --threads N to choose)")
    trainer = Trainer(cfg, args.data, out, max_steps=args.max_steps, resume=args.resume, progress=not args.no_progress)

    def stop_between_steps(signum, frame):
        # A second signal stops one process at once (the newest checkpoint on disk is complete). Several processes
        # keep going to the step boundary they agreed on: their launcher's own signal must not break the save.
        if trainer.stop_requested and world == 1:
            raise KeyboardInterrupt(
                f"stopped without saving; resume from the newest checkpoint with: {resume_command(args.argv)}"
            )
        if not trainer.stop_requested and trainer.is_main:
            print(
                f"\n{signal.Signals(signum).name}: saving a checkpoint after this step"
                f"{' (again to stop at once)' if world == 1 else ''}",
                file=sys.stderr,
            )
        trainer.stop_requested = True

    previous = {s: signal.signal(s, stop_between_steps) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = trainer.train()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if trainer.stop_requested:
        if trainer.is_main:
            again = resume_command(args.argv) if world == 1 else "the same launch command with --resume"
            print(
                f"interrupted at step {result.steps} of {trainer.total_steps}; checkpoint "
                f"{ckpt.latest_checkpoint(out)}\nresume with: {again}",
                file=sys.stderr,
            )
        return 130
    return 0


def check_one_process_layout(cfg: TrainConfig, overrides: list[str]) -> None:
    """One process ignores the layout: refuse one asked for on this command line, and say so for one that came
    with a config (a run may resume at another size)."""
    layout = cfg.parallel
    if max(layout.dp_replicate, layout.dp_shard, layout.ep) <= 1:
        return
    asked = [
        item
        for item in overrides
        if item.split("=", 1)[0] in ("parallel.dp_replicate", "parallel.dp_shard", "parallel.ep")
    ]
    if asked:
        raise ValueError(
            f"--set {asked[0]} needs several processes, but this is one: add --nproc N (or start it with torchrun)"
        )
    print(
        f"note: one process; the config's layout (dp_replicate={layout.dp_replicate} dp_shard={layout.dp_shard} "
        f"ep={layout.ep}) applies only with --nproc or torchrun",
        file=sys.stderr,
    )


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
    if args.threads is not None:
        out += ["--threads", str(max(1, args.threads // args.nproc))]
    return out
