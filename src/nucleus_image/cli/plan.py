"""`nucleus plan`: memory per GPU, computed from shapes on the meta device (nothing is allocated).

    nucleus plan --task train --preset released --gpus 8 --gpu-memory 80
    nucleus plan --task generate --preset released --gpu-memory 24 --quantize int8 --offload-text-encoder

A plan counts parameters, gradients, optimizer states, activations and communication buffers; not the CUDA
context, NCCL's buffers, the allocator's fragmentation or the VAE decode. So a layout fits when its peak stays
--margin below the card's memory (default: 10% of it).
"""

from __future__ import annotations

GIB = 2**30
# The Qwen3-VL text encoder in bf16 (16.5 GB), for the released preset's generation plan.
TEXT_ENCODER_GB = {"released": 16.5}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plan",
        help="per-GPU memory of training layouts or generation choices",
        description="Per-rank memory of each training layout (parameters, gradients, optimizer "
        "states, activations with and without checkpointing, all-to-all buffers, "
        "the optimizer step's workspace: Muon's gathers and Newton-Schulz, AdamW's) "
        "and the recommended one; or peak memory of generation choices.",
    )
    p.add_argument("--task", choices=("train", "generate"), default="train", help="what to plan (default train)")
    p.add_argument(
        "--preset", default="released", help="training preset (train) or model preset (generate); default released"
    )
    p.add_argument("--gpus", type=int, default=8, help="GPUs for training (default 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="global batch (train: default the preset's last stage) or images per call (generate: default 2)",
    )
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the last stage's / 1024)")
    p.add_argument(
        "--quantize", choices=("bf16", "int8", "fp8"), default="bf16", help="generation weights (default bf16)"
    )
    p.add_argument("--offload-text-encoder", action="store_true", help="free the text encoder after encoding")
    p.add_argument(
        "--text-encoder-gb",
        type=float,
        default=None,
        help="text encoder size in GB (default 16.5 for released: Qwen3-VL in bf16; 0 otherwise)",
    )
    p.add_argument(
        "--margin",
        type=float,
        default=None,
        metavar="GIB",
        help="memory kept free for what the plan does not count: CUDA context, NCCL buffers, "
        "fragmentation (default: 10%% of --gpu-memory)",
    )
    p.add_argument("--all", action="store_true", help="print every layout, not only the feasible ones")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.gpu_memory <= 0:
        raise ValueError(f"--gpu-memory must be > 0 GiB, got {args.gpu_memory}")
    args.margin = round(0.1 * args.gpu_memory, 2) if args.margin is None else args.margin
    if not 0 <= args.margin < args.gpu_memory:
        raise ValueError(f"--margin {args.margin:g} GiB must be >= 0 and below --gpu-memory {args.gpu_memory:g}")
    memory = int((args.gpu_memory - args.margin) * GIB)  # what a plan may use
    if args.task == "generate":
        return _generate(args, memory)
    return _train(args, memory)


def _train(args, memory: int) -> int:
    from nucleus_image.planning import plan_training
    from nucleus_image.training.config import TrainConfig

    if args.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
    cfg = TrainConfig.preset(args.preset)
    plans = plan_training(
        cfg,
        gpus=args.gpus,
        gpu_memory=memory,
        global_batch=args.batch_size,
        height=args.size,
        width=args.size,
        vae_factor=8 if cfg.autoencoder != "pixel" else _pixel_factor(cfg),
    )
    stage = cfg.stages[-1]
    print(
        f"training {args.preset} on {args.gpus} x {args.gpu_memory:g} GiB: global batch "
        f"{args.batch_size or stage.batch_size} at {args.size or stage.resolution} px, bf16 compute, fp32 master "
        f"weights and optimizer states (per rank, GiB); fits: peak <= {memory / GIB:g} GiB, the card less a "
        f"{args.margin:g} GiB margin"
    )
    shown = plans if args.all else [p for p in plans if p.fits]
    header = [
        "layout",
        "micro x accum",
        "params",
        "grads",
        "Muon mom.",
        "AdamW mom.",
        "FSDP buf",
        "act (no ckpt)",
        "act (ckpt)",
        "all-to-all",
        "optimizer step",
        "peak",
        "fits",
        "comm/step",
    ]
    rows = [
        [
            str(p.layout),
            f"{p.micro_batch} x {p.grad_accum}",
            *(
                f"{v / GIB:.2f}"
                for v in (
                    p.parameters,
                    p.gradients,
                    p.muon_momentum,
                    p.adamw_moments,
                    p.fsdp_buffers,
                    p.activations_no_checkpointing,
                    p.activations_checkpointing,
                    p.all_to_all,
                    p.optimizer_step,
                    p.peak,
                )
            ),
            ("yes" if p.fits else "no") + (" (ckpt)" if p.checkpointing else ""),
            f"{p.comm_per_step / GIB:.1f}",
        ]
        for p in shown
    ]
    _table(header, rows)
    if not plans[0].fits:
        print(
            f"no layout fits {memory / GIB:g} GiB per GPU ({args.gpu_memory:g} less the {args.margin:g} GiB "
            f"margin); the smallest peak is {min(p.peak for p in plans) / GIB:.1f} GiB"
        )
        return 1
    best = plans[0]
    print(
        f"recommended: {best.layout}"
        + (f", {best.grad_accum} accumulation steps" if best.grad_accum > 1 else "")
        + (", activation checkpointing" if best.checkpointing else "")
        + f" (peak {best.peak / GIB:.2f} of {args.gpu_memory:g} GiB; fewest accumulation steps, then no "
        f"checkpointing, then least communication):"
    )
    print("  " + train_command(args.preset, args.gpus, best))
    if args.gpus > 8:
        print(
            "  (on several machines: the same flags after `torchrun --nnodes M --nproc-per-node G ... -m "
            "nucleus_image train`, without --nproc)"
        )
    if args.batch_size or args.size:
        print("  (the command trains the preset's stages; set their batch_size/resolution to what you planned)")
    return 0


def train_command(preset: str, gpus: int, plan) -> str:
    """The `nucleus train` line for a plan (DATA and RUN to fill in); on several machines the same --set flags
    follow `torchrun ... -m nucleus_image train`."""
    layout = plan.layout
    sets = [f"parallel.dp_shard={layout.dp_shard}", f"parallel.ep={layout.ep}"]
    if layout.dp_replicate > 1:
        sets.insert(0, f"parallel.dp_replicate={layout.dp_replicate}")
    if plan.grad_accum > 1:
        sets.append(f"grad_accum_steps={plan.grad_accum}")
    if plan.checkpointing:
        sets.append("gradient_checkpointing=true")
    return f"nucleus train --preset {preset} --data DATA --out RUN --nproc {gpus} " + " ".join(
        f"--set {item}" for item in sets
    )


def _generate(args, memory: int) -> int:
    from nucleus_image.model import NucleusConfig
    from nucleus_image.planning import plan_generation

    config = NucleusConfig.preset(args.preset)
    gb = args.text_encoder_gb if args.text_encoder_gb is not None else TEXT_ENCODER_GB.get(args.preset, 0.0)
    size = args.size or 1024
    print(
        f"generating with {args.preset} at {size}x{size}, batch {args.batch_size or 2}, text encoder "
        f"{gb * 1e9 / GIB:.2f} GiB (GiB; fits: peak <= {memory / GIB:g} GiB, the card less a {args.margin:g} GiB "
        f"margin). An offloaded encoder is on the GPU only while it encodes, before the transformer is moved there."
    )
    rows = []
    for weights in ("bf16", "int8", "fp8"):
        for offload in (False, True):
            plan = plan_generation(
                config,
                weights=weights,
                height=size,
                width=size,
                batch=args.batch_size or 2,
                text_encoder_bytes=int(gb * 1e9),
                offload_text_encoder=offload,
            )
            chosen = weights == args.quantize and offload == args.offload_text_encoder
            rows.append(
                [
                    weights,
                    "offloaded" if offload else "resident",
                    f"{plan.transformer_weights / GIB:.2f}",
                    f"{0 if offload else plan.text_encoder / GIB:.2f}",
                    f"{plan.activations / GIB:.2f}",
                    f"{plan.peak / GIB:.2f}",
                    "yes" if plan.peak <= memory else "no",
                    "yes" if chosen else "",
                ]
            )
    _table(
        ["weights", "text encoder", "transformer", "encoder while denoising", "activations", "peak", "fits", "chosen"],
        rows,
    )
    return 0 if any(r[-1] and r[-2] == "yes" for r in rows) else 1


def _pixel_factor(cfg) -> int:
    return max(round((cfg.model.latent_channels / 3) ** 0.5), 1)


def _table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")
