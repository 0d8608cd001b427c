"""The process group and device meshes of a torchrun-launched run.

One root mesh ([dp_replicate,] efsdp, ep) with ranks in row-major order, so an EP group is a run of
consecutive ranks and the global batch is split over ranks in rank order. Views of it:

    dp      what non-expert parameters are FSDP-sharded over: ("dp_replicate", "dp_shard") or "dp_shard",
            where dp_shard = efsdp x ep flattened
    experts what expert stacks are FSDP-sharded over: ("dp_replicate", "efsdp") or "efsdp"
    ep      the expert-parallel group that exchanges tokens
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .config import ParallelConfig


@dataclass
class ParallelDims:
    layout: ParallelConfig
    rank: int
    mesh: DeviceMesh
    dp_shard_mesh: DeviceMesh  # efsdp x ep flattened
    device: torch.device
    host_group: dist.ProcessGroup  # gloo over all ranks, for host-side agreement (collectives.StopVote, barrier)

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def dp_mesh(self) -> DeviceMesh:
        return self.mesh["dp_replicate", "dp_shard"] if self.layout.dp_replicate > 1 else self.dp_shard_mesh

    @property
    def expert_mesh(self) -> DeviceMesh:
        return self.mesh["dp_replicate", "efsdp"] if self.layout.dp_replicate > 1 else self.mesh["efsdp"]

    @property
    def ep_mesh(self) -> DeviceMesh:
        return self.mesh["ep"]

    @property
    def shard_group(self) -> dist.ProcessGroup:
        """The processes that together hold one replica: a sum over them counts every parameter once."""
        return self.dp_shard_mesh.get_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world() -> int:
    """The number of processes torchrun started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_parallel(parallel: ParallelConfig, device: torch.device) -> ParallelDims:
    """Join torchrun's process group (gloo on CPU, nccl on GPU) and build the meshes for the layout."""
    layout = parallel.resolve(launched_world())
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # The CPU device type even on a GPU host for gloo runs, or fully_shard would move parameters to CUDA.
    # The replicate dimension only when it is used: FSDP composes with the experts' EP placement by
    # concatenating its mesh with the ep mesh, and that must give back the whole root mesh.
    shape, names = (layout.efsdp, layout.ep), ("efsdp", "ep")
    if layout.dp_replicate > 1:
        shape, names = (layout.dp_replicate, *shape), ("dp_replicate", *names)
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    dp_shard_mesh = mesh["efsdp", "ep"]._flatten("dp_shard")
    # Its own group even on CPU hosts, where the default group is gloo too: the stop vote stays in flight across
    # a step, and must not queue among the step's own collectives.
    host_group = dist.new_group(backend="gloo")
    return ParallelDims(layout, dist.get_rank(), mesh, dp_shard_mesh, device, host_group)
