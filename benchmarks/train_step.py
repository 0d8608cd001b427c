"""Training-step throughput: images/s and model FLOP utilisation for 1 vs N processes at the same global batch.

    python benchmarks/train_step.py                                   # CPU: tiny preset, 1 vs 2 processes (gloo)
    python benchmarks/train_step.py --device cuda --preset small --batch 16 --size 256 --procs 1

One step is the trainer's own `training.step.train_step`: the flow-matching objective (`loss.FlowObjective`) on
noised latents through the transformer, backward, gradient clipping, Muon + AdamW (`training.optim.build_optimizers`). Data is random latents of the step's shape, so the
figure is the step itself, not decoding. N > 1 processes are started with torchrun (gloo on CPU, nccl on GPU)
and run the training path of `nucleus train --nproc N`: `parallel.parallelize` (FSDP2 over the N processes, and
with `--ep` expert parallelism over them too), Muon gathering each sharded matrix, the meshes' gradient
clipping. Each takes B/N samples, so N processes do the same work per step as one. Threads: one process gets all
`--threads`, N processes share them equally.

FLOPs are counted from shapes (`transformer_forward.flops_per_forward`, x3 for forward + backward). The peak is
stated: on CPU an fp32 matmul of 2048^3 measured in the same run with all threads (the machine's practical peak),
on CUDA `--peak-tflops` (default 989: H200 dense bf16). Prints one row per process count and the ratio to 1.

`--parallel` runs the torch.distributed path (process group, FSDP2 through `parallel.parallelize`) even for one
process, `--compile` compiles each block there, `--losses` adds each step's loss and the peak memory of the run to
the JSON a worker prints (the GPU suite compares the one-process NCCL path with the plain one this way).
`--kernels triton` runs the model on the fused Triton kernels (nucleus_image.kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from transformer_forward import flops_per_forward  # noqa: E402

from nucleus_image.model import NucleusConfig, NucleusTransformer  # noqa: E402
from nucleus_image.model.latents import pack_latents  # noqa: E402
from nucleus_image.parallel.config import ParallelConfig  # noqa: E402
from nucleus_image.parallel.mesh import init_parallel  # noqa: E402
from nucleus_image.parallel.parallelize import parallelize  # noqa: E402
from nucleus_image.planning.measure import peak_memory  # noqa: E402
from nucleus_image.training.config import OptimizerConfig  # noqa: E402
from nucleus_image.training.loss import FlowBatch, FlowObjective  # noqa: E402
from nucleus_image.training.optim import build_optimizers  # noqa: E402
from nucleus_image.training.step import train_step  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument("--batch", type=int, default=16, help="global batch (default 16)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--text-tokens", type=int, default=16, help="text tokens per sample (default 16)")
    p.add_argument("--steps", type=int, default=12, help="timed steps (default 12) after 3 warm-up steps")
    p.add_argument("--procs", default="1,2", help="process counts to compare (default 1,2)")
    p.add_argument("--ep", action="store_true", help="with N > 1: expert parallelism over the N processes too")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads shared by the processes")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--peak-tflops", type=float, default=None, help="stated peak (CUDA default 989, H200 bf16)")
    p.add_argument("--layers", type=int, default=None, help="blocks of the preset to keep (default all)")
    p.add_argument("--parallel", action="store_true", help="the FSDP2 path even for one process")
    p.add_argument("--compile", action="store_true", help="with the FSDP2 path: compile each block")
    p.add_argument("--losses", action="store_true", help="report each step's loss and the peak memory")
    p.add_argument("--kernels", default="eager", choices=("eager", "triton"), help="the model's kernels (eager)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def latent_shape(cfg: NucleusConfig, size: int, device: str) -> tuple[int, int]:
    """(latent channels, latent side): the pixel autoencoder's space-to-depth on CPU presets whose latent is RGB
    patches, the Qwen-Image VAE's factor 8 otherwise."""
    channels = cfg.in_channels // cfg.patch_size**2
    factor = round((channels / 3) ** 0.5) if channels % 3 == 0 else 8
    return channels, size // factor


def worker(args) -> dict:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    torch.set_num_threads(max(1, args.threads // world) if device.type == "cpu" else 1)
    parallel = world > 1 or args.parallel
    dims = init_parallel(ParallelConfig(dp_shard=world, ep=world if args.ep else 1), device) if parallel else None
    if dims:
        device = dims.device
    elif device.type == "cuda":
        torch.cuda.set_device(device)
    with peak_memory(device) if args.losses else nullcontext({}) as peak:
        result = _train(args, rank, world, device, dims)
    if args.losses:
        result["peak_bytes"] = peak["peak"]
    if dims:
        torch.distributed.destroy_process_group()
    return result


def _train(args, rank: int, world: int, device: torch.device, dims) -> dict:
    cfg = NucleusConfig.preset(args.preset)
    if args.layers:
        cfg = cfg.replace(num_layers=args.layers)
    cfg = cfg.replace(kernels=args.kernels)
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} does not divide over {world} processes")
    local = args.batch // world
    torch.manual_seed(0)
    model = NucleusTransformer(cfg).to(device)
    if dims:
        parallelize(model, dims, activation_checkpointing=False, compile=args.compile, bf16=device.type == "cuda")
    opt_cfg = OptimizerConfig(lr=1e-3, warmup_steps=0)
    muon, adamw, _ = build_optimizers(model, opt_cfg, torch.bfloat16 if device.type == "cuda" else torch.float32)
    channels, side = latent_shape(cfg, args.size, args.device)
    g = torch.Generator(device).manual_seed(rank)
    latents = torch.randn(local, channels, side, side, generator=g, device=device)
    text = torch.randn(local, args.text_tokens, cfg.joint_attention_dim, generator=g, device=device)
    x0 = pack_latents(latents, cfg.patch_size)
    grid = side // cfg.patch_size
    objective = FlowObjective(cfg.patch_size, autocast=device.type == "cuda")

    def step():
        batch = FlowBatch(
            x0,
            torch.randn(x0.shape, generator=g, device=device),
            torch.rand(local, generator=g, device=device),
            text,
            None,
            (side, side),
        )
        # no warmup: any step's lr
        return train_step(model, [muon, adamw], [batch], objective, opt_cfg, step=0, dims=dims).loss

    losses = [step() for _ in range(3)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    if world > 1:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    losses += [step() for _ in range(args.steps)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    flops = 3 * flops_per_forward(cfg, args.batch, grid * grid, args.text_tokens) * args.steps
    result = {"procs": world, "images_per_s": args.batch * args.steps / seconds, "tflops": flops / seconds / 1e12}
    if args.losses:
        result["losses"] = [float(v) for v in losses]
    return result


def cpu_peak_tflops(threads: int) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048**3 / (time.perf_counter() - t0) / 1e12


def launch(args, procs: int, argv: list[str]) -> dict:
    """One row: in this process, or under torchrun for N > 1 processes or the FSDP2 path (`--parallel`)."""
    if procs == 1 and not args.parallel:
        return worker(args)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={procs}",
        str(Path(__file__).resolve()),
        *[a for a in argv if a != "--worker"],
        "--worker",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{procs}-process run failed:\n{done.stderr[-3000:]}")
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.worker:
        result = worker(args)
        if int(os.environ.get("RANK", 0)) == 0:
            print(json.dumps(result))
        return
    peak = args.peak_tflops or (989.0 if args.device == "cuda" else cpu_peak_tflops(args.threads))
    print(
        f"{args.preset} preset{' (FSDP2 + EP when N > 1)' if args.ep else ' (FSDP2 when N > 1)'}, global batch {args.batch} at {args.size}px, {args.steps} steps, {args.device}, "
        f"{args.threads} threads; peak {peak:.3f} TFLOP/s ({'stated' if args.peak_tflops or args.device == 'cuda' else 'fp32 2048^3 matmul, measured now'})"
    )
    rows = [launch(args, int(n), argv) for n in args.procs.split(",")]
    base = rows[0]["images_per_s"]
    print("| processes | images/s | TFLOP/s | MFU | vs first |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['procs']} | {r['images_per_s']:.1f} | {r['tflops']:.4f} | {100 * r['tflops'] / peak:.1f}% | "
            f"{r['images_per_s'] / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
