"""The parallel layout of a training run: how many processes replicate, shard and hold experts.

    parallel.dp_replicate   replicas of the sharded model (HSDP's outer dimension); 1 = plain FSDP
    parallel.dp_shard       processes one replica is FSDP-sharded over; 0 = all the processes a replica has
    parallel.ep             expert-parallel degree, borrowed from dp_shard (as in TorchTitan): each EP rank holds
                            num_experts/ep whole experts, and within a replica the experts are FSDP-sharded over
                            the remaining efsdp = dp_shard/ep processes

Every process is a data-parallel rank (EP ranks see different samples too), so a stage's `batch_size` is the
global batch and each process takes batch_size / (grad_accum_steps * world) samples per micro-step.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    dp_replicate: int = 1
    dp_shard: int = 0
    ep: int = 1
    compile: bool = False  # torch.compile each block (inductor on GPU, aot_eager on CPU)
    # "full": every rank builds the seeded full model on its host, then shards it (the same weights as one
    # process; small models). "meta": build on the meta device, shard, then materialise and initialise only each
    # rank's shards (what a 17B model needs; the numbers differ from a one-process init).
    init: str = "full"

    def resolve(self, world: int) -> ParallelConfig:
        """The layout for `world` processes (dp_shard=0 filled in), or a ValueError saying what divides what."""
        if self.dp_replicate < 1 or self.dp_shard < 0 or self.ep < 1:
            raise ValueError(
                f"parallel.dp_replicate and parallel.ep must be >= 1 and parallel.dp_shard >= 0 "
                f"(0 = the rest); got dp_replicate={self.dp_replicate}, dp_shard={self.dp_shard}, ep={self.ep}"
            )
        if self.init not in ("full", "meta"):
            raise ValueError(f"parallel.init {self.init!r}; accepted: full, meta")
        if world % self.dp_replicate:
            raise ValueError(f"parallel.dp_replicate={self.dp_replicate} does not divide the {world} processes")
        dp_shard = self.dp_shard or world // self.dp_replicate
        if self.dp_replicate * dp_shard != world:
            raise ValueError(
                f"parallel.dp_replicate * parallel.dp_shard = {self.dp_replicate} * {dp_shard} = "
                f"{self.dp_replicate * dp_shard}, but {world} processes were started; they must be equal"
            )
        if dp_shard % self.ep:
            raise ValueError(
                f"parallel.ep={self.ep} must divide parallel.dp_shard={dp_shard} (expert-parallel ranks are "
                f"borrowed from the shard dimension)"
            )
        return ParallelConfig(self.dp_replicate, dp_shard, self.ep, self.compile, self.init)

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """Processes each expert stack is FSDP-sharded over within a replica."""
        return self.dp_shard // self.ep


def check_layout(layout: ParallelConfig, num_experts: int, batch_sizes: dict[str, int], grad_accum_steps: int) -> None:
    """Refuse, before any work, a layout the model or the stages cannot be split over."""
    errors = []
    if num_experts % layout.ep:
        errors.append(
            f"parallel.ep={layout.ep} must divide model.num_experts={num_experts} (each EP rank holds whole experts)"
        )
    if grad_accum_steps < 1:
        errors.append(f"grad_accum_steps must be >= 1, got {grad_accum_steps}")
    else:
        per_step = grad_accum_steps * layout.world
        for name, batch in batch_sizes.items():
            if batch % per_step:
                errors.append(
                    f"stage {name}: batch_size {batch} (the global batch) is not divisible by grad_accum_steps "
                    f"* processes = {grad_accum_steps} * {layout.world} = {per_step}"
                )
    if errors:
        raise ValueError("invalid parallel layout: " + "; ".join(errors))
