"""Parallelism applied to a finished, plain `NucleusTransformer` (the model code knows nothing of it), in
TorchTitan's order: activation checkpointing, then per-block torch.compile, then per-block `fully_shard`, then
the root.

FSDP units, innermost first:
    expert stacks     (EP only) sharded over the ep mesh as whole experts, then FSDP over efsdp (and the
                      replicate dimension); gradients divided by the data-parallel degree (see expert_parallel)
    text side         each block's encoder_proj, add_k_proj, add_v_proj and norm_added_k: the model computes
                      every block's text keys/values before running the blocks, outside the blocks' forward,
                      so they must gather on their own forward rather than the block's
    block             the rest of each block
    root              embeddings, output norm and head
"""

from __future__ import annotations

import warnings

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from ..model import NucleusTransformer
from .expert_parallel import apply_expert_parallel
from .mesh import ParallelDims


# FSDP2 warns when a unit returns a view, because an in-place op on that view would drop the unit's pre-backward
# hook. The only unit here that returns one is each block's text-side `encoder_proj` (a Linear on 3-D input
# returns its matmul reshaped); its output is read only by add_k_proj and add_v_proj, out of place, so the hook
# always runs. Checked: N processes train to the one-process run's weights (tests/test_distributed.py).
# Installed by every parallelize() call as well as on import: a caller's warnings.catch_warnings() block around the
# first import would otherwise take the filter away with it.
def ignore_view_warning() -> None:
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPLinear\) returned a view tensor")


ignore_view_warning()


def mixed_precision(bf16: bool) -> MixedPrecisionPolicy:
    """bf16: parameters gathered in bf16 for compute, gradients reduce-scattered (and all-reduced across replicas)
    in fp32; otherwise everything in the parameters' dtype. The planner counts FSDP's buffers and traffic from
    this policy."""
    return (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    )


def parallelize(
    model: NucleusTransformer, dims: ParallelDims, *, activation_checkpointing: bool, compile: bool, bf16: bool
) -> NucleusTransformer:
    """Shard `model` in place for `dims`; bf16 keeps parameters in bf16 for compute with fp32 gradient
    reduction (FSDP2 MixedPrecisionPolicy; the sharded master weights stay fp32)."""
    ignore_view_warning()
    mp = mixed_precision(bf16)
    if activation_checkpointing:
        model.enable_gradient_checkpointing()
    backend = "inductor" if dims.device.type == "cuda" else "aot_eager"
    for blk in model.transformer_blocks:
        if compile:
            blk.compile(backend=backend)
        if blk.is_moe and dims.layout.ep > 1:
            experts = blk.img_mlp.experts
            apply_expert_parallel(experts, dims.ep_mesh)
            fully_shard(experts, mesh=dims.expert_mesh, mp_policy=mp)
            experts.set_gradient_divide_factor(float(dims.world))
            if dims.expert_mesh.size() > 1:
                # Sum, then divide: a factor other than the group size is a PREMUL_SUM, which gloo lacks. (Not on
                # a one-process expert mesh, where FSDP skips the collective and this would divide twice.)
                experts.set_force_sum_reduction_for_comms(True)
        for text_side in (blk.encoder_proj, blk.attn.add_k_proj, blk.attn.add_v_proj, blk.attn.norm_added_k):
            fully_shard(text_side, mesh=dims.dp_mesh, mp_policy=mp)
        fully_shard(blk, mesh=dims.dp_mesh, mp_policy=mp)
    fully_shard(model, mesh=dims.dp_mesh, mp_policy=mp)
    # The pipeline calls encode_text outside forward (text keys/values once per prompt set): FSDP must gather the
    # root's parameters for it too, so every rank can sample from its shards (training.sampling).
    register_fsdp_forward_method(model, "encode_text")
    return model
