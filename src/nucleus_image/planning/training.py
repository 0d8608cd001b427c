"""Per-rank training memory for each layout of a GPU count, and the layout to use.

A layout is (dp_replicate, dp_shard, ep) with dp_replicate * dp_shard = GPUs and ep dividing dp_shard and the
expert count: every parameter is FSDP-sharded over dp_shard (experts first split whole over ep, then sharded
over the dp_shard/ep ranks of their expert group) and replicated over dp_replicate. Per rank:

- parameters: fp32 master shards, 4 B x params / dp_shard;
- gradients: fp32 shards of the same size;
- optimizer states: Muon's momentum (one fp32 tensor per Muon matrix), AdamW's two fp32 moments;
- FSDP buffers: the copy of the block being computed and of the prefetched next one (a block's experts over ep
  only) in the compute dtype, and its unsharded gradient before the reduce-scatter in the reduce dtype, both
  from the mixed-precision policy `parallel.parallelize` applies (bf16 and fp32). One process has no FSDP: its
  fp32 weights are cast by autocast, which keeps a bf16 copy of every weight from the forward to the backward;
- activations: measured per sample on the meta device (`activations.py`), times the micro-batch, with and
  without per-block activation checkpointing;
- all-to-all buffers (ep > 1): the (E, b*C, D) token buffer out and back per MoE layer, with C from the model's
  own `expert_capacity`, held for backward in every MoE layer without checkpointing, one layer's worth with it;
- the optimizer step, after the backward has freed activations and FSDP buffers: Muon's (`training.muon.
  step_peak_bytes` walking the step's own schedule on the rank's shards: one Newton-Schulz batch at a time, the
  all-to-all buffers that bring a rank its share of the row-split matrices whole, the iteration's workspace) or
  AdamW's (torch's foreach implementation on GPUs: one temporary per moment tensor), whichever is larger.

Peak = parameters + gradients + optimizer states + max(FSDP buffers + activations + all-to-all, optimizer step).

The global batch is split over dp_replicate * dp_shard ranks; when a rank's share does not fit, gradient
accumulation halves the micro-batch until it does. Communication per step is estimated from the same shapes
(FSDP all-gathers and reduce-scatters, the replicate all-reduce, the all-to-alls) to rank the layouts that fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..model import NucleusConfig
from ..model.moe import expert_capacity
from ..parallel.parallelize import mixed_precision
from ..training.muon import PlannedMatrix, row_splits, step_peak_bytes
from .activations import training_activations
from .shapes import count_params, latent_tokens

GIB = 2**30


@dataclass(frozen=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    ep: int

    def __str__(self) -> str:
        return f"dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} ep={self.ep}"


@dataclass(frozen=True)
class TrainingPlan:
    layout: Layout
    micro_batch: int
    grad_accum: int
    checkpointing: bool
    parameters: int
    gradients: int
    muon_momentum: int
    adamw_moments: int
    fsdp_buffers: int
    activations: int
    activations_no_checkpointing: int
    activations_checkpointing: int
    all_to_all: int
    muon_step: int
    adamw_step: int
    comm_per_step: int
    gpu_memory: int

    @property
    def optimizer_step(self) -> int:
        return max(self.muon_step, self.adamw_step)

    @property
    def peak(self) -> int:
        return (
            self.parameters
            + self.gradients
            + self.muon_momentum
            + self.adamw_moments
            + max(self.fsdp_buffers + self.activations + self.all_to_all, self.optimizer_step)
        )

    @property
    def fits(self) -> bool:
        return self.peak <= self.gpu_memory

    def rows(self) -> list[tuple[str, str]]:
        g = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
        return [
            ("layout", str(self.layout)),
            ("micro-batch x accumulation", f"{self.micro_batch} x {self.grad_accum}"),
            ("parameters (fp32 shards)", g(self.parameters)),
            ("gradients (fp32 shards)", g(self.gradients)),
            ("optimizer: Muon momentum", g(self.muon_momentum)),
            ("optimizer: AdamW moments", g(self.adamw_moments)),
            ("FSDP block buffers (one process: autocast's weight copies)", g(self.fsdp_buffers)),
            ("activations, no checkpointing", g(self.activations_no_checkpointing)),
            ("activations, checkpointing", g(self.activations_checkpointing)),
            ("all-to-all buffers", g(self.all_to_all)),
            ("optimizer step: Muon (its gathers included)", g(self.muon_step)),
            ("optimizer step: AdamW", g(self.adamw_step)),
            (
                "peak",
                f"{g(self.peak)} ({'checkpointing' if self.checkpointing else 'no checkpointing'}) "
                f"of {g(self.gpu_memory)}: {'fits' if self.fits else 'does not fit'}",
            ),
            ("communication per step", g(self.comm_per_step)),
        ]


def layouts(gpus: int, num_experts: int) -> list[Layout]:
    out = []
    for shard in range(1, gpus + 1):
        if gpus % shard:
            continue
        for ep in range(1, shard + 1):
            if shard % ep == 0 and num_experts % ep == 0:
                out.append(Layout(gpus // shard, shard, ep))
    return out


def plan_layout(
    config: NucleusConfig,
    layout: Layout,
    *,
    global_batch: int,
    height: int,
    width: int,
    gpu_memory: int,
    text_tokens: int = 128,
    capacity_factor: float | None = None,
    grad_accum: int | None = None,
    vae_factor: int = 8,
    ns_dtype: torch.dtype = torch.bfloat16,
) -> TrainingPlan:
    """The plan for one layout. Without `grad_accum`, the fewest accumulation steps that fit (checkpointing
    only when needed); the smallest micro-batch if nothing fits. `ns_dtype` is Muon's Newton-Schulz dtype (the
    trainer's on GPUs: bfloat16)."""
    ranks = layout.dp_replicate * layout.dp_shard
    if global_batch % ranks:
        raise ValueError(f"global batch {global_batch} does not divide over dp_replicate*dp_shard={ranks} ranks")
    per_rank = global_batch // ranks
    choices = [a for a in range(1, per_rank + 1) if per_rank % a == 0] if grad_accum is None else [grad_accum]
    best = None
    for accum in choices:
        for ckpt in (False, True):
            plan = _plan(
                config,
                layout,
                per_rank // accum,
                accum,
                ckpt,
                height,
                width,
                gpu_memory,
                text_tokens,
                capacity_factor,
                vae_factor,
                ns_dtype,
            )
            if plan.fits:
                return plan
            best = plan
    return best


@lru_cache(maxsize=256)
def muon_step_bytes(
    config: NucleusConfig, layout: Layout, ns_dtype: torch.dtype = torch.bfloat16, rank: int | None = None
) -> int:
    """Peak bytes of Muon's step on `rank` of a shard group of `layout` (the largest over its ranks when None):
    expert stacks held whole (E/ep experts, FSDP-split over the dp_shard/ep ranks of an expert group), every
    other matrix split by rows over dp_shard (or whole when dp_shard is 1), walked through Muon's own schedule."""
    ranks = range(layout.dp_shard) if rank is None else [rank]
    return max(step_peak_bytes(_muon_matrices(config, layout, r), ns_dtype) for r in ranks)


def _muon_matrices(config: NucleusConfig, layout: Layout, rank: int) -> list[PlannedMatrix]:
    efsdp = layout.dp_shard // layout.ep
    out = []
    for expert, shape in count_params(config).muon_shapes:
        if expert:
            # The mesh is (efsdp, ep) row-major: rank = efsdp index * ep + ep index.
            held = row_splits(shape[0] // layout.ep, efsdp)[rank // layout.ep]
            out.append(PlannedMatrix(shape, n=held))
        elif layout.dp_shard > 1:
            out.append(PlannedMatrix(shape, row_splits=row_splits(shape[0], layout.dp_shard), rank=rank))
        else:
            out.append(PlannedMatrix(shape))
    return out


def plan_training(
    config,
    *,
    gpus: int,
    gpu_memory: int,
    global_batch: int | None = None,
    height: int | None = None,
    width: int | None = None,
    text_tokens: int = 128,
    vae_factor: int = 8,
) -> list[TrainingPlan]:
    """Plans for every layout of `gpus`, the recommended one first: those that fit, by fewest accumulation
    steps, then without checkpointing, then least communication. `config` is a TrainConfig (its last stage
    sets batch, resolution and capacity factors unless given) or a NucleusConfig (then batch and size are required).
    `vae_factor` is the autoencoder's pixels per latent (8 for the Qwen-Image VAE)."""
    from ..training.config import TrainConfig

    if isinstance(config, TrainConfig):
        stage = config.stages[-1]
        global_batch = global_batch or stage.batch_size
        height = height or stage.resolution
        width = width or stage.resolution
        # The stage's capacity factors, as the trainer sets them (they size the expert buffers and activations).
        model = (
            config.model.replace(capacity_factors=tuple(stage.capacity_factors))
            if stage.capacity_factors
            else config.model
        )
    else:
        model = config
    if global_batch is None or height is None or width is None:
        raise ValueError("plan_training of a model config needs global_batch, height and width")
    if gpus < 1 or gpu_memory < 1:
        raise ValueError(f"--gpus and --gpu-memory must be >= 1, got {gpus} and {gpu_memory} bytes")
    plans = []
    for layout in layouts(gpus, model.num_experts if model.moe_layers else 1):
        if global_batch % (layout.dp_replicate * layout.dp_shard) == 0:
            plans.append(
                plan_layout(
                    model,
                    layout,
                    global_batch=global_batch,
                    height=height,
                    width=width,
                    gpu_memory=gpu_memory,
                    text_tokens=text_tokens,
                    vae_factor=vae_factor,
                )
            )
    if not plans:
        raise ValueError(f"global batch {global_batch} does not divide over {gpus} GPUs")
    return sorted(plans, key=lambda p: (not p.fits, p.grad_accum, p.checkpointing, p.comm_per_step, p.peak))


def _plan(
    config, layout, micro, accum, ckpt, height, width, gpu_memory, text_tokens, capacity_factor, vae_factor, ns_dtype
) -> TrainingPlan:
    counts = count_params(config)
    grid = latent_tokens(config, height, width, vae_factor)
    shard, ep = layout.dp_shard, layout.ep
    mp = mixed_precision(bf16=True)
    compute, reduce = mp.param_dtype.itemsize, mp.reduce_dtype.itemsize
    dense = counts.total - counts.experts
    per_rank = lambda n: -(-n // shard)  # noqa: E731
    block_local = counts.largest_block - counts.largest_block_experts + counts.largest_block_experts // ep
    if layout.dp_replicate * shard > 1:
        # Two blocks gathered (current + prefetched), the current block's unsharded gradient before reduce-scatter.
        fsdp = 2 * compute * block_local + reduce * block_local
    else:
        fsdp = compute * counts.total  # autocast's copy of every weight
    no_ckpt = training_activations(config, grid, text_tokens, False)
    with_ckpt = training_activations(config, grid, text_tokens, True)
    moe = config.moe_layers
    a2a_layers = []  # per MoE layer: its (E, b*C, D) token buffer out and back
    if ep > 1:
        for i in moe:
            C = expert_capacity(capacity_factor or config.capacity_factors[i], grid[0] * grid[1], config.num_experts)
            a2a_layers.append(2 * config.num_experts * micro * C * config.hidden_size * compute)
    a2a = max(a2a_layers, default=0) if ckpt else sum(a2a_layers)
    fsdp_comm = 0  # per micro-batch: FSDP gathers again for each
    if shard > 1:
        frac = (shard - 1) / shard
        per_param = 2 * compute + reduce  # all-gather forward + backward, reduce-scatter
        fsdp_comm += int(per_param * dense * frac)
        expert_group = shard // ep
        if expert_group > 1:
            fsdp_comm += int(per_param * counts.experts / ep * (expert_group - 1) / expert_group)
    a2a_comm = int(2 * sum(a2a_layers) * (ep - 1) / ep)  # per micro-batch, forward and backward
    replicate_comm = 0
    if layout.dp_replicate > 1:
        replicate_comm = int(2 * reduce * per_rank(counts.total) * (layout.dp_replicate - 1) / layout.dp_replicate)
    comm = (fsdp_comm + a2a_comm) * accum + replicate_comm
    return TrainingPlan(
        layout=layout,
        micro_batch=micro,
        grad_accum=accum,
        checkpointing=ckpt,
        parameters=4 * per_rank(counts.total),
        gradients=4 * per_rank(counts.total),
        muon_momentum=4 * per_rank(counts.muon),
        adamw_moments=8 * per_rank(counts.adamw),
        fsdp_buffers=fsdp,
        activations=micro * (with_ckpt.peak if ckpt else no_ckpt.peak),
        activations_no_checkpointing=micro * no_ckpt.peak,
        activations_checkpointing=micro * with_ckpt.peak,
        all_to_all=a2a,
        muon_step=muon_step_bytes(config, layout, ns_dtype),
        adamw_step=4 * per_rank(counts.adamw),
        comm_per_step=comm,
        gpu_memory=gpu_memory,
    )
