"""`nucleus distill`: a few-step, guidance-free student of a pipeline, trained and shipped as a LoRA adapter.

    nucleus distill --model runs/demo/merged --data runs/demo/data --out runs/distill --steps 4
    nucleus distill --out runs/distill --resume          # continue a killed run from its newest checkpoint
    nucleus generate --model runs/demo/merged --lora runs/distill/adapter --prompt "a red circle" --out samples/

The teacher (--teacher-steps with --teacher-guidance, as the pipeline samples) is run once over --trajectories
noise seeds and dataset captions; the student learns to reach the teacher's states in --steps Euler steps of one
transformer row each. The adapter (RUN/adapter/, peft's format) carries the student's sampler settings, so
`--lora` in generate and serve samples it at its own steps without guidance.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from nucleus_image.cli.arguments import add_threads_arg


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "distill",
        help="distil a pipeline into a few-step, guidance-free LoRA student",
        description="Distil a pipeline's guided sampler into a few-step student without "
        "guidance, trained as a LoRA adapter that carries its sampler settings.",
    )
    p.add_argument("--model", help="teacher pipeline folder (model_index.json, transformer/, ...)")
    p.add_argument("--data", help="dataset folder holding manifest-vNNNN/: its captions are the prompts distilled on")
    p.add_argument("--out", required=True, help="run folder (created)")
    p.add_argument("--steps", type=int, default=4, help="the student's sampling steps (default 4)")
    p.add_argument(
        "--teacher-steps", type=int, default=16, help="the teacher's sampling steps, a multiple of --steps (default 16)"
    )
    p.add_argument("--teacher-guidance", type=float, default=4.0, help="the teacher's guidance scale (default 4.0)")
    p.add_argument("--trajectories", type=int, default=None, help="teacher trajectories generated once (default 2048)")
    p.add_argument("--lora-rank", type=int, default=None, help="adapter rank (default 32)")
    p.add_argument(
        "--init-adapter",
        default=None,
        help="a saved adapter folder of the same rank (a finished student's RUN/adapter) the student starts from",
    )
    p.add_argument("--train-steps", type=int, default=None, help="optimizer steps (default 500)")
    p.add_argument("--batch-size", type=int, default=None, help="trajectories per optimizer step (default 32)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 0.004)")
    p.add_argument("--resolution", type=int, default=0, help="square side in pixels (default: the model's native)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other field of the distill config, dotted for sections (e.g. rollout=teacher, "
        "optimizer.kind=adamw, caption_weights=[3,1,0,0]; "
        "caption weights default to the teacher's training run's, when its merge.json names one)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the captions, noise and batches (default 0)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total (resume later)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    add_threads_arg(p)
    p.set_defaults(func=run)


def build_config(args):
    from nucleus_image.distill.distiller import DistillConfig

    if not args.model or not args.data:
        raise ValueError("--model and --data are required (except with --resume of an existing run)")
    for flag, folder in (("--model", args.model), ("--data", args.data)):
        if not Path(folder).is_dir():
            raise ValueError(f"{flag} {folder!r} is not a folder")
    fields = {
        "model": str(Path(args.model).resolve()),
        "data": str(Path(args.data).resolve()),
        "student_steps": args.steps,
        "teacher_steps": args.teacher_steps,
        "teacher_guidance": args.teacher_guidance,
        "resolution": args.resolution,
        "seed": args.seed,
    }
    for flag, key in (
        ("trajectories", "trajectories"),
        ("lora_rank", "lora_rank"),
        ("train_steps", "steps"),
        ("batch_size", "batch_size"),
    ):
        if getattr(args, flag) is not None:
            fields[key] = getattr(args, flag)
    if args.lr is not None:
        fields["optimizer"] = {"lr": args.lr}
    if args.init_adapter is not None:
        fields["init_adapter"] = str(Path(args.init_adapter).resolve())
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r} is not KEY=VALUE (e.g. rollout=teacher, optimizer.lr=1e-3)")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *sections, last = key.split(".")
        node = fields
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key!r}: {part!r} is not a section")
        node[last] = value
    if "caption_weights" not in fields:
        fields["caption_weights"] = teacher_caption_weights(Path(args.model))
    if "optimizer" in fields:  # the flags name some optimizer fields; the others keep distillation's defaults
        from nucleus_image.distill.distiller import default_optimizer
        from nucleus_image.training.config import to_plain

        fields["optimizer"] = {**to_plain(default_optimizer()), **fields["optimizer"]}
    cfg = DistillConfig.from_dict(fields)
    cfg.validate()
    return cfg


def teacher_caption_weights(model: Path) -> list[float]:
    """The caption weights the teacher was trained with, when its folder is a `nucleus merge` of a training run
    that is still on disk (merge.json names it): the student then learns the prompts the teacher knows. Else
    uniform (an empty list)."""
    try:
        run = json.loads((model / "merge.json").read_text())["run"]
        return list(json.loads((Path(run) / "train_config.json").read_text())["caption_weights"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return []


def run(args) -> int:
    from nucleus_image.distill.distiller import CONFIG_NAME, DistillConfig, Distiller

    out = Path(args.out)
    if args.resume:
        if not (out / CONFIG_NAME).exists():
            raise ValueError(f"--resume: {str(out)!r} holds no distillation run ({CONFIG_NAME} is missing)")
        cfg = DistillConfig.from_dict(json.loads((out / CONFIG_NAME).read_text()))
    else:
        cfg = build_config(args)
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.threads is not None:  # recorded in the run's config, so --resume keeps it
        cfg = replace(cfg, cpu_threads=args.threads)
    distiller = Distiller(cfg, out, resume=args.resume, progress=not args.no_progress)
    distiller.train(args.max_steps)
    if distiller.step < cfg.steps:
        print(f"stopped at step {distiller.step} of {cfg.steps}; continue with: nucleus distill --out {out} --resume")
    else:
        print(
            f"done: {cfg.steps} steps; adapter in {out / 'adapter'} (sample it with nucleus generate --lora "
            f"{out / 'adapter'})"
        )
    if distiller.validation_log:  # the last training losses against the held-out ones: memorising shows as a gap
        tail = distiller.state.losses[-cfg.checkpoint_every :]
        print(
            f"loss at step {distiller.step}: training {sum(tail) / max(len(tail), 1):.5f} (mean of the last "
            f"{len(tail)} steps), validation {distiller.validation_log[-1]['loss']:.5f} "
            f"(step {distiller.validation_log[-1]['step']}; all in {out / 'validation.json'})"
        )
    return 0
