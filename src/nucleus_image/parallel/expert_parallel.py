"""Expert parallelism for expert-choice routing, applied from outside the model.

Each EP rank keeps num_experts/ep whole experts: the expert stacks become DTensors sharded on the expert
dimension (`Shard(0)`) over the ep mesh, so checkpoints see one global (E, ...) tensor per FQN. Routing, top-C,
renormalisation and the shared expert stay local: a sample lives on one rank and every expert picks its C
tokens within each sample. Only the (E, B*C, D) token buffer the MoE layer hands its experts travels:

    dispatch  (E, B*C, D) -> equal-split all-to-all -> (E/ep, ep*B*C, D): each rank's own experts, tokens of
              every rank of the group in rank order
    experts   the model's unchanged batched matmuls on the local stacks
    combine   the reverse all-to-all -> (E, B*C, D), the buffer the layer expected back

Every expert takes exactly C tokens from every sample, so the splits are static: no count exchange, no
device-to-host sync, no padding. The all-to-all is autograd-aware (its backward is the reverse exchange).
Because it carries the gradients of every rank's local-mean loss back to the expert, expert gradients come
out summed over the data-parallel ranks; `parallelize` divides them by the data-parallel degree.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor


def apply_expert_parallel(experts: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard `experts` (any module whose parameters are (E, ...) stacks and whose forward maps an (E, T, D)
    buffer to (E, T, D')) over `ep_mesh` and route its input and output through the all-to-all."""
    ep = ep_mesh.size()
    for name, p in list(experts.named_parameters(recurse=False)):
        if p.shape[0] % ep:
            raise ValueError(f"expert parameter {name!r} has {p.shape[0]} experts, not divisible by ep={ep}")
        # Every rank holds the same full init: slice locally (src_data_rank=None), no broadcast.
        local = distribute_tensor(p.data, ep_mesh, [Shard(0)], src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(local, requires_grad=p.requires_grad))
    group = ep_mesh.get_group()

    def dispatch(module, args):
        (x_ETD,) = args
        E, T, D = x_ETD.shape
        recv = funcol.all_to_all_single_autograd(x_ETD.reshape(E * T, D), None, None, group)
        # (source rank, local expert, token, D) -> (local expert, source rank * token, D)
        recv_LRD = recv.view(ep, E // ep, T, D).transpose(0, 1).reshape(E // ep, ep * T, D)
        return (DTensor.from_local(recv_LRD, ep_mesh, [Shard(0)], run_check=False),)

    def combine(module, args, out):
        y = out.to_local() if isinstance(out, DTensor) else out
        local_experts, RT, D = y.shape
        T = RT // ep
        y = y.view(local_experts, ep, T, D).transpose(0, 1).reshape(ep * local_experts * T, D)
        back = funcol.all_to_all_single_autograd(y.contiguous(), None, None, group)
        return back.view(ep * local_experts, T, D)

    experts.register_forward_pre_hook(dispatch)
    experts.register_forward_hook(combine)


def is_expert_param(p: torch.Tensor) -> bool:
    """Whether a (possibly FSDP-sharded) parameter lives on a mesh with an ep dimension."""
    return isinstance(p, DTensor) and "ep" in (p.device_mesh.mesh_dim_names or ())
