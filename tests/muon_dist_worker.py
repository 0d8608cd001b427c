"""One rank of the distributed-Muon check (run by tests/test_muon_distributed.py under torchrun, gloo, one thread).

For each parallel layout of the world: the seeded model is sharded with the project's `parallelize` (FSDP2, with
expert parallelism when ep > 1), every parameter gets the same full gradient on every rank (each rank keeps its
shard), and five Muon steps run on the sharded model and on a plain copy. Rank 0 writes, per layout: whether
every weight equals the plain copy's bit for bit (and the largest difference), the collectives of one step by
kind (CommDebugMode), the shapes of the Muon weights split by rows, and on every rank the peak bytes a step
allocates (LiveBytes, the least over the steps after the first) next to the planner's figure for that rank.

    torchrun --standalone --nproc-per-node 4 tests/muon_dist_worker.py OUT.json
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from nucleus_image.model import NucleusTransformer
from nucleus_image.parallel.config import ParallelConfig
from nucleus_image.parallel.mesh import init_parallel
from nucleus_image.parallel.parallelize import parallelize
from nucleus_image.planning.measure import LiveBytes
from nucleus_image.planning.training import Layout, muon_step_bytes
from nucleus_image.training.config import OptimizerConfig
from nucleus_image.training.optim import build_optimizers

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from training_helpers import MICRO_MODEL  # noqa: E402

# Heads of 30 channels: 90-wide hidden states and 30-row k/v projections, which 4 ranks split unevenly; 4 blocks,
# so that the matrices outnumber their shapes.
CONFIG = MICRO_MODEL.replace(
    attention_head_dim=30, axes_dims_rope=(4, 12, 14), num_layers=4, capacity_factors=(0.0, 2.0, 1.0, 2.0)
)
LAYOUTS = [dict(dp_shard=4), dict(dp_shard=4, ep=2), dict(dp_replicate=2, dp_shard=2, ep=2)]  # 4 processes
STEPS = 5


def optimizer(model):
    muon, _, _ = build_optimizers(model, OptimizerConfig(lr=2e-2, weight_decay=0.1), torch.float32)
    return muon


def grads_for(step: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(100 + step)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in NucleusTransformer(CONFIG).named_parameters()}
    return {n: torch.randn(s) for n, s in shapes.items()}


def run_layout(layout: dict) -> dict:
    dims = init_parallel(ParallelConfig(**layout), torch.device("cpu"))
    torch.manual_seed(0)
    model = NucleusTransformer(CONFIG)
    plain = NucleusTransformer(CONFIG)
    plain.load_state_dict(model.state_dict())
    parallelize(model, dims, activation_checkpointing=False, compile=False, bf16=False)
    muon, ref = optimizer(model), optimizer(plain)
    params = dict(model.named_parameters())
    split = [
        tuple(p.shape)
        for g in muon.param_groups
        for p in g["params"]
        if p.dim() == 2 and any(pl.is_shard() for pl in p.placements)
    ]
    counts, peaks, planned = {}, [], 0
    for step in range(STEPS):
        grads = grads_for(step)
        for name, p in params.items():
            p.grad = (
                distribute_tensor(grads[name], p.device_mesh, p.placements, src_data_rank=None)
                if isinstance(p, DTensor)
                else grads[name].clone()
            )
        for name, p in plain.named_parameters():
            p.grad = grads[name]
        ref.step()
        if step >= 1:  # momentum exists: what the step itself allocates
            with CommDebugMode() as comm, LiveBytes() as live:
                muon.step()
            counts = {str(k): v for k, v in comm.get_comm_counts().items()}
            # gloo's worker thread sometimes drops its references to a finished all-to-all's buffers a moment after
            # wait() returns, so one step can count a freed buffer twice; the least of the measured steps is the
            # step's own allocation.
            peaks.append(live.peak)
            lay = dims.layout
            planned = muon_step_bytes(
                CONFIG,
                Layout(lay.dp_replicate, lay.dp_shard, lay.ep),
                torch.float32,
                rank=dist.get_rank(dims.shard_group),
            )
        else:
            muon.step()
    diffs = {}
    for name, p in plain.named_parameters():
        full = params[name].full_tensor() if isinstance(params[name], DTensor) else params[name]
        diffs[name] = (full.detach() - p.detach()).abs().max().item()
    peak = min(peaks)
    peaks = [torch.zeros(2, dtype=torch.int64) for _ in range(dist.get_world_size())]
    dist.all_gather(peaks, torch.tensor([peak, planned]))
    return {
        "layout": layout,
        "max_diff": max(diffs.values()),
        "bitwise": all(d == 0 for d in diffs.values()),
        "worst": max(diffs, key=diffs.get),
        "collectives": counts,
        "split_shapes": split,
        "muon_tensors": sum(len(g["params"]) for g in muon.param_groups),
        "peaks": [[int(a), int(b)] for a, b in peaks],
    }


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = [run_layout(layout) for layout in LAYOUTS]
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
