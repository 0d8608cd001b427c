"""`nucleus finetune`: LoRA fine-tuning of a saved pipeline on your images (peft adapters; QLoRA with --quantize).

    nucleus finetune --model runs/demo/merged --data data/concept --out runs/lora --lora-rank 16 [--quantize int8]
    nucleus finetune --out runs/lora --resume          # continue a killed run from its newest checkpoint

The adapter lands in RUN/adapter/ (peft's adapter_config.json + adapter_model.safetensors); load it with
`NucleusPipeline.from_pretrained(...).load_lora("RUN/adapter", scale=1.0)`.
"""

from __future__ import annotations

import json
from pathlib import Path

from nucleus_image.cli.arguments import add_threads_arg


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="LoRA fine-tuning of a pipeline on a dataset (peft; QLoRA with --quantize)",
        description="Fine-tune LoRA adapters on a saved pipeline's transformer.",
    )
    p.add_argument("--model", help="pipeline folder to adapt (model_index.json, transformer/, ...)")
    p.add_argument("--data", help="dataset folder holding manifest-vNNNN/ (e.g. from `nucleus data synth`)")
    p.add_argument("--out", required=True, help="run folder (created)")
    p.add_argument("--lora-rank", type=int, default=16, help="adapter rank (default 16)")
    p.add_argument("--lora-alpha", type=float, default=None, help="adapter alpha (default: the rank)")
    p.add_argument(
        "--quantize",
        choices=("int8", "fp8"),
        default=None,
        help="8-bit frozen base weights, QLoRA (default: none, the base in full precision)",
    )
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--resolution", type=int, default=0, help="training side in pixels (default: the model's native)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapters' init, the data order and the noise")
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many steps in total, to resume later (default: --steps)",
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from dataclasses import replace

    from nucleus_image.lora.finetune import CONFIG_NAME, FinetuneConfig, Finetuner, default_optimizer

    out = Path(args.out)
    if args.resume and (out / CONFIG_NAME).exists():
        cfg = FinetuneConfig.from_dict(json.loads((out / CONFIG_NAME).read_text()))
    else:
        if not args.model or not args.data:
            raise ValueError("--model and --data are required (except with --resume of an existing run)")
        for flag, folder in (("--model", args.model), ("--data", args.data)):
            if not Path(folder).is_dir():
                raise ValueError(f"{flag} {folder!r} is not a folder")
        cfg = FinetuneConfig(
            model=str(Path(args.model).resolve()),
            data=str(Path(args.data).resolve()),
            lora_rank=args.lora_rank,
            lora_alpha=args.lora_alpha,
            quantize=args.quantize,
            steps=args.steps,
            batch_size=args.batch_size,
            optimizer=replace(default_optimizer(), lr=args.lr),
            resolution=args.resolution,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
        )
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    if args.threads is not None:  # recorded in the run's config, so --resume keeps it
        cfg = replace(cfg, cpu_threads=args.threads)
    losses = Finetuner(cfg, out, resume=args.resume, progress=not args.no_progress).train(args.max_steps)
    if len(losses) < cfg.steps:
        print(
            f"stopped at step {len(losses)} of {cfg.steps} (--max-steps {args.max_steps}), loss {losses[-1]:.4f}; "
            f"the adapter so far is in {out / 'adapter'}; continue with: nucleus finetune --out {out} --resume"
        )
    else:
        print(f"done: {len(losses)} steps, final loss {losses[-1]:.4f}; adapter in {out / 'adapter'}")
    return 0
