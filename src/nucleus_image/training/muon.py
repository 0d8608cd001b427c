"""Muon: momentum SGD whose update is orthogonalised by a Newton-Schulz iteration, for matrix weights.

For a weight W (rows x cols) with gradient G: B <- mu*B + (1-mu)*G (momentum), U = G + mu*(B - G) (Nesterov,
i.e. G.lerp(B, mu)), O = NS5(U) ~ the nearest semi-orthogonal matrix U V^T of U = U S V^T, and

    W <- W * (1 - lr*wd) - lr * 0.2 * sqrt(max(rows, cols)) * O

The factor 0.2*sqrt(max(rows, cols)) makes the update's RMS that of a typical AdamW update (~0.2), so Muon and
AdamW groups can share one learning rate and schedule (Moonlight; `torch.optim.Muon(adjust_lr_fn=
"match_rms_adamw")`). This matches torch's Muon on 2-D weights, and extends it to every tensor that holds one
matrix per expert: a stacked (E, rows, cols) expert weight, and peft's LoRA factors of such a weight, which peft
keeps as 2-D (r*E, cols) / (rows, r*E) tensors (`ExpertFactor`). Each expert's matrix is orthogonalised and
scaled on its own: orthogonalising a stack as one matrix would couple experts that never see each other's tokens.

One step, per parameter group:
  1. momentum for every parameter at once (foreach, on the local tensors);
  2. every matrix to orthogonalise (a 2-D weight, one expert of a stack, one expert's LoRA factor) joins the batch
     of matrices of its shape, oriented wide (rows <= cols: a (256, 128) weight joins the (128, 256) batch
     transposed, as NS would transpose it anyway);
  3. one batched Newton-Schulz per batch (the same per-matrix result as one matrix at a time, at one set of
     kernel launches per shape instead of per matrix), and each matrix's update applied in place.

Under FSDP2 / expert parallelism parameters are DTensors. Expert stacks split along the expert dimension are
whole matrices on each rank: orthogonalised where they are, no communication. A 2-D weight FSDP split by rows
needs its whole matrix, and the work is spread over the shard group (the DistMuon / dion pattern): within each
shape batch every matrix gets one owner rank (round robin, continuing across batches so ranks share the work),
one all-to-all sends each rank's row shards to the owners, each owner orthogonalises its whole matrices, and a
second all-to-all returns to every rank its rows of each result. That is two collectives per shape batch, no
Newton-Schulz is repeated on two ranks, and a rank holds whole only its ~1/W share of one batch at a time
(`step_peak_bytes` counts it for the planner). Results equal one process's bit for bit whenever the gradients do.
The all-to-alls run on the parameters' own device through `parallel.collectives.all_to_all_split`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from ..parallel.collectives import all_to_all_split

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # quintic, slope-maximising at 0 (Keller Jordan's Muon)
MAX_BATCH_BYTES = 256 * 2**20  # default cap on one Newton-Schulz call's batch


@dataclass(frozen=True)
class ExpertFactor:
    """A 2-D tensor holding one small matrix per expert, in peft's layout for the LoRA factors of a stacked
    (E, ., .) weight (`ParamWrapper`): `dim=0` is lora_A, (r*E, cols) with expert e in rows e*r .. e*r+r-1;
    `dim=1` is lora_B, (rows, r*E) with expert e in columns e, E+e, 2E+e, ...  `matrices` is a view (no copy)."""

    experts: int
    dim: int

    def matrices(self, t: torch.Tensor) -> torch.Tensor:
        if t.dim() != 2 or t.shape[self.dim] % self.experts:
            raise ValueError(
                f"an expert factor must be 2-D with dim {self.dim} divisible by {self.experts} experts; "
                f"got shape {tuple(t.shape)}"
            )
        if self.dim == 0:
            return t.view(self.experts, -1, t.shape[1])  # (E, r, cols)
        return t.view(t.shape[0], -1, self.experts).permute(2, 0, 1)  # (E, rows, r)


def orthogonalize(
    g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximate U V^T for each trailing (rows, cols) matrix of g (any leading batch dims), in `dtype`.

    Singular values land in roughly [0.7, 1.2] rather than exactly 1: the coefficients trade exactness for
    speed, which does not hurt training (see torch.optim.Muon's notes)."""
    if g.dim() < 2:
        raise ValueError(f"Muon orthogonalises matrices; got a tensor of shape {tuple(g.shape)}")
    transpose = g.size(-2) > g.size(-1)
    wide = g.mT if transpose else g
    x = torch.empty((math.prod(g.shape[:-2]), *wide.shape[-2:]), dtype=dtype, device=g.device)
    x.copy_(wide.reshape(x.shape))
    out = newton_schulz_(x, steps, eps).view(wide.shape)
    return out.mT if transpose else out


def newton_schulz_(x: torch.Tensor, steps: int, eps: float) -> torch.Tensor:
    """The iteration on a batch x (n, rows, cols) with rows <= cols, which it normalises in place (the caller's
    buffer); returns the result, x or one more buffer of its shape. Besides x it holds exactly that buffer and
    two (n, rows, rows) ones, in x's dtype (`ns_workspace_bytes`): every product is written into them."""
    a, b, c = NS_COEFFICIENTS
    # Frobenius norm per matrix bounds the spectral norm, so every singular value starts in (0, 1].
    x.div_(x.norm(dim=(-2, -1), keepdim=True).clamp_(min=eps))
    n, rows, _ = x.shape
    other = torch.empty_like(x)
    gram = x.new_empty(n, rows, rows)
    poly = x.new_empty(n, rows, rows)
    for _ in range(steps):
        torch.bmm(x, x.mT, out=gram)
        torch.baddbmm(gram, gram, gram, beta=b, alpha=c, out=poly)  # b*gram + c*gram@gram
        torch.baddbmm(x, poly, x, beta=a, out=other)  # a*x + poly@x
        x, other = other, x
    return x


def update_scale(shape: torch.Size | tuple[int, ...]) -> float:
    """0.2 * sqrt(max(rows, cols)) of one matrix (the trailing two dims)."""
    return 0.2 * math.sqrt(max(shape[-2], shape[-1]))


def ns_workspace_bytes(n: int, rows: int, cols: int, dtype: torch.dtype) -> int:
    """Bytes `newton_schulz_` allocates beside its input batch of n (rows, cols) matrices."""
    a, b = min(rows, cols), max(rows, cols)
    return (n * a * b + 2 * n * a * a) * dtype.itemsize


def matrices_per_call(rows: int, cols: int, dtype: torch.dtype, max_batch_bytes: int) -> int:
    """How many (rows, cols) matrices one Newton-Schulz call takes: as many as fit `max_batch_bytes` (at least
    one). Batching pays for small matrices (kernel launches); the cap bounds the workspace for large ones."""
    return max(1, max_batch_bytes // (rows * cols * dtype.itemsize))


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights, stacked (E, rows, cols) expert weights and peft's per-expert LoRA factors (given in
    `expert_factors`, parameter -> ExpertFactor). `ns_dtype` bfloat16 matches the reference implementation on
    GPU; float32 is faster on CPUs without bf16 matmul units. `max_batch_bytes` caps one Newton-Schulz call's
    batch (in `ns_dtype`): its workspace is about 2-3x that (`ns_workspace_bytes`)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        eps: float = 1e-7,
        ns_dtype: torch.dtype = torch.bfloat16,
        expert_factors: Mapping[torch.Tensor, ExpertFactor] | None = None,
        max_batch_bytes: int = MAX_BATCH_BYTES,
    ):
        if lr <= 0 or not 0.0 <= momentum < 1.0 or weight_decay < 0:
            raise ValueError(
                f"Muon needs lr > 0, 0 <= momentum < 1, weight_decay >= 0; got lr={lr}, momentum={momentum}, weight_decay={weight_decay}"
            )
        defaults = dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps, eps=eps
        )
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype
        self.max_batch_bytes = max_batch_bytes
        # Keyed by identity: the views are fixed by where peft put each factor, not saved with the state.
        self.expert_factors = {id(p): f for p, f in (expert_factors or {}).items()}
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() not in (2, 3):
                    raise ValueError(
                        f"Muon takes 2-D matrices or 3-D expert stacks; got a parameter of shape {tuple(p.shape)}"
                    )
                if id(p) in self.expert_factors:
                    self.expert_factors[id(p)].matrices(p.detach())  # refuses a factor that does not split

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # `found_inf` (1.0: skip this step), set by `step.train_step` as torch's fused AdamW reads it: a skipped step
        # leaves every weight and momentum buffer as it was, decided on the device without reading the flag. The
        # skipped step still runs every collective, so the ranks stay in step.
        found_inf = getattr(self, "found_inf", None)
        keep = None if found_inf is None else 1.0 - found_inf
        for group in self.param_groups:
            self._step_group(group, keep)
        return loss

    def _step_group(self, group: dict, keep: torch.Tensor | None) -> None:
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        members, grads, bufs = [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            grads.append(_local(p.grad))
            bufs.append(_local(state["momentum_buffer"]))
            members.append(_Member.of(p, self.expert_factors.get(id(p))))
        if not members:
            return
        if keep is None:
            torch._foreach_lerp_(bufs, grads, 1 - mu)
            if wd:
                torch._foreach_mul_([m.local for m in members], 1 - lr * wd)
        else:
            # Masked: a skipped step's momentum weight and decay are 0, its update is multiplied by 0 (`_BatchRun`);
            # its non-finite gradients are zeroed first so that no NaN reaches a product with 0.
            weight = keep * (1 - mu)
            for g, buf in zip(grads, bufs):
                buf.lerp_(g.nan_to_num_(0.0, 0.0, 0.0), weight.to(buf.dtype))
            if wd:
                torch._foreach_mul_([m.local for m in members], 1 - keep * (lr * wd))
        for m, g, buf in zip(members, grads, bufs):
            m.grad, m.buf = g, buf
        run = _BatchRun(group, self.ns_dtype, keep)
        for rows, cols, work, first_owner in _schedule(members, self.ns_dtype, self.max_batch_bytes):
            if first_owner is None:
                run.whole(work, rows, cols)
            else:
                run.sharded(work, rows, cols, first_owner)


# ---- one step's matrices: batched by shape, spread over the ranks of a shard group ------------------------------
@dataclass
class _Member:
    """One parameter's place in the step: its local data, its matrices' global shape and, for a weight split by
    rows, the group it is split over and every rank's number of rows; and this step's local gradient and momentum."""

    local: torch.Tensor  # the parameter's local data (updated in place)
    factor: ExpertFactor | None
    rows: int  # one matrix's global shape
    cols: int
    n: int  # whole matrices this rank holds (1 for a weight split by rows: the one it has rows of)
    group: object = None  # the ProcessGroup of a weight split by rows (None: whole here)
    row_splits: tuple[int, ...] = ()  # every rank's rows of it
    rank: int = 0  # this rank in `group`
    grad: torch.Tensor | None = None
    buf: torch.Tensor | None = None

    @classmethod
    def of(cls, p: torch.Tensor, factor: ExpertFactor | None) -> _Member:
        local = _local(p.data)
        if isinstance(p, DTensor) and not _whole_on_each_rank(p):
            mesh_dim = _row_shard_dim(p)
            if mesh_dim is None or factor is not None:
                raise ValueError(
                    f"Muon orthogonalises 2-D weights split by rows and expert stacks split by expert "
                    f"(LoRA factors replicated); got a parameter of shape {tuple(p.shape)} with "
                    f"placements {p.placements}"
                )
            world = p.device_mesh.size(mesh_dim)
            if world > 1:
                pg = p.device_mesh.get_group(mesh_dim)
                return cls(local, None, p.shape[0], p.shape[1], 1, pg, row_splits(p.shape[0], world), dist.get_rank(pg))
        view = factor.matrices(local) if factor else _stack(local)
        return cls(local, factor, view.shape[-2], view.shape[-1], view.shape[0])

    @property
    def key(self) -> tuple:
        return min(self.rows, self.cols), max(self.rows, self.cols), self.local.device

    @property
    def transposed(self) -> bool:
        return self.rows > self.cols

    def matrices(self, t: torch.Tensor) -> torch.Tensor:
        """t (shaped like the local data) as this member's local matrices, oriented wide."""
        m = self.factor.matrices(t) if self.factor else _stack(t)
        return m.mT if self.transposed else m

    def row_range(self, rank: int) -> tuple[int, int]:
        start = sum(self.row_splits[:rank])
        return start, start + self.row_splits[rank]


def row_splits(rows: int, world: int) -> tuple[int, ...]:
    """Each rank's rows of a dimension of `rows` split over `world` ranks, as DTensor's Shard and FSDP2 split it
    (torch.chunk: ceil(rows / world) each while rows last, then fewer or none)."""
    size = -(-rows // world)
    return tuple(max(0, min(size, rows - r * size)) for r in range(world))


def _chunks(members: list[_Member], per_call: int):
    """The members' matrices in order, cut into runs of at most `per_call`: lists of (member, first, stop)."""
    chunk, room = [], per_call
    for m in members:
        first = 0
        while first < m.n:
            take = min(room, m.n - first)
            chunk.append((m, first, first + take))
            first, room = first + take, room - take
            if room == 0:
                yield chunk
                chunk, room = [], per_call
    if chunk:
        yield chunk


def _schedule(members: list[_Member], ns_dtype: torch.dtype, max_batch_bytes: int):
    """The Newton-Schulz calls of one group's step, in order, as (rows, cols, work, first_owner) with rows <= cols:
    batches by shape in order of first appearance; in each, the whole matrices this rank holds in chunks of
    `matrices_per_call` ((member, first, stop) runs, first_owner None), then the weights split by rows, per
    process group, in chunks W times that (each owner holds ~1/W of one whole), with the round-robin owner of their
    first matrix. Every rank walks the same sequence, so the ranks agree on owners without talking."""
    batches: dict[tuple, list[_Member]] = {}
    for m in members:
        batches.setdefault(m.key, []).append(m)
    owner = 0
    for (rows, cols, _), batch in batches.items():
        per_call = matrices_per_call(rows, cols, ns_dtype, max_batch_bytes)
        for chunk in _chunks([m for m in batch if m.group is None], per_call):
            yield rows, cols, chunk, None
        split: dict[object, list[_Member]] = {}
        for m in batch:
            if m.group is not None:
                split.setdefault(m.group, []).append(m)
        for items in split.values():
            step = per_call * len(items[0].row_splits)
            for i in range(0, len(items), step):
                yield rows, cols, items[i : i + step], owner
                owner += len(items[i : i + step])


def _owners(first_owner: int, count: int, world: int) -> list[int]:
    return [(first_owner + i) % world for i in range(count)]


# ---- what the planner reads: the same schedule on shapes ----------------------------------------------------------
@dataclass(frozen=True)
class PlannedMatrix:
    """What the planner knows of one Muon parameter on one rank: its global shape, and either the whole matrices
    this rank holds (`n`: 1 for a 2-D weight, E local experts for a stack) or, for a weight split by rows, every
    rank's rows of it and this rank's index."""

    shape: tuple[int, ...]
    n: int = 1
    row_splits: tuple[int, ...] = ()
    rank: int = 0


def step_peak_bytes(
    params: list[PlannedMatrix],
    ns_dtype: torch.dtype,
    param_dtype: torch.dtype = torch.float32,
    max_batch_bytes: int = MAX_BATCH_BYTES,
) -> int:
    """Most bytes one rank's Muon step allocates at once beyond the weights, gradients and momentum (which exist
    before it), walking the step's own schedule: per Newton-Schulz call its batch, the iteration's workspace and,
    for weights split by rows, the send and receive buffers of the two all-to-alls; plus the Nesterov update of one
    member in the parameter dtype where it cannot be written straight into the batch."""
    members = []
    for p in params:
        rows, cols = p.shape[-2:]
        if p.row_splits:
            local = torch.empty(p.row_splits[p.rank], cols, dtype=param_dtype, device="meta")
            members.append(_Member(local, None, rows, cols, 1, "split", p.row_splits, p.rank))
        else:
            members.append(
                _Member(torch.empty(p.n, rows, cols, dtype=param_dtype, device="meta"), None, rows, cols, p.n)
            )
    size, cast = ns_dtype.itemsize, param_dtype != ns_dtype
    peak = 0
    for rows, cols, work, first_owner in _schedule(members, ns_dtype, max_batch_bytes):
        if first_owner is None:
            n = sum(stop - first for _, first, stop in work)
            temp = max((stop - first) for _, first, stop in work) * rows * cols * param_dtype.itemsize if cast else 0
            peak = max(peak, n * rows * cols * size + max(temp, ns_workspace_bytes(n, rows, cols, ns_dtype)))
        else:
            rank, world = work[0].rank, len(work[0].row_splits)
            owned = _owners(first_owner, len(work), world).count(rank)
            mine = sum(m.row_splits[rank] * m.cols for m in work)
            temp = max(m.row_splits[rank] * m.cols for m in work) * param_dtype.itemsize if cast else 0
            whole = owned * rows * cols * size
            peak = max(
                peak,
                mine * size + temp,
                mine * size + whole,
                2 * whole,
                whole + ns_workspace_bytes(owned, rows, cols, ns_dtype),
            )
    return peak


# ---- running the schedule ----------------------------------------------------------------------------------------
class _BatchRun:
    """The Newton-Schulz calls of one parameter group's step (see `_schedule`)."""

    def __init__(self, group: dict, ns_dtype: torch.dtype, keep: torch.Tensor | None = None):
        self.lr, self.steps, self.eps, self.dtype = group["lr"], group["ns_steps"], group["eps"], ns_dtype
        self.mu, self.nesterov = group["momentum"], group["nesterov"]
        self.keep = keep  # the found_inf mask (1: apply, 0: a skipped step), or None

    def _ns(self, x: torch.Tensor) -> torch.Tensor:
        x = newton_schulz_(x, self.steps, self.eps)
        return x if self.keep is None else x.mul_(self.keep)

    def _update_into(self, out: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor) -> None:
        """out <- the Nesterov update grad.lerp(buf, mu) (or the momentum), computed in the gradient's dtype
        and then cast, as one process casts it; written in place when the dtypes agree."""
        if not self.nesterov:
            out.copy_(buf)
        elif out.dtype == grad.dtype:
            torch.lerp(grad, buf, self.mu, out=out)
        else:
            out.copy_(grad.lerp(buf, self.mu))

    def whole(self, chunk: list[tuple[_Member, int, int]], rows: int, cols: int) -> None:
        """Matrices this rank holds whole: into one batch, Newton-Schulz, each update added where it came from."""
        x = torch.empty(
            sum(stop - first for _, first, stop in chunk), rows, cols, dtype=self.dtype, device=chunk[0][0].local.device
        )
        k = 0
        for m, first, stop in chunk:
            self._update_into(x[k : k + stop - first], m.matrices(m.grad)[first:stop], m.matrices(m.buf)[first:stop])
            k += stop - first
        x = self._ns(x)
        alpha = -self.lr * update_scale((rows, cols))
        k = 0
        for m, first, stop in chunk:
            m.matrices(m.local)[first:stop].add_(x[k : k + stop - first], alpha=alpha)
            k += stop - first

    def sharded(self, items: list[_Member], rows: int, cols: int, first_owner: int) -> None:
        """Weights split by rows over `pg`: one all-to-all brings each matrix's rows to its owner, the owner runs
        Newton-Schulz on its whole matrices, a second all-to-all returns each rank's rows of every result.
        Splits are exact row counts (uneven shards need no padding), in the Newton-Schulz dtype."""
        pg, world, rank = items[0].group, len(items[0].row_splits), items[0].rank
        owner = _owners(first_owner, len(items), world)
        by_owner = sorted(range(len(items)), key=lambda i: owner[i])  # stable: by owner, then batch order
        owned = [items[i] for i in by_owner if owner[i] == rank]
        mine = [items[i].row_splits[rank] * items[i].cols for i in by_owner]  # my rows of each, in send order
        to_owner = [sum(n for i, n in zip(by_owner, mine) if owner[i] == r) for r in range(world)]
        from_rank = [sum(m.row_splits[r] * m.cols for m in owned) for r in range(world)]

        send = self._pack_updates([items[i] for i in by_owner], mine)
        recv = all_to_all_split(send, from_rank, to_owner, pg, items[0].local.device)
        del send
        x = _whole_from_rows(recv, owned, world, rows, cols)
        del recv
        x = self._ns(x)
        send = _rows_from_whole(x, owned, world)
        del x
        recv = all_to_all_split(send, to_owner, from_rank, pg, items[0].local.device)
        del send
        alpha = -self.lr * update_scale((rows, cols))
        for m, piece in zip((items[i] for i in by_owner), recv.split(mine)):
            m.local.add_(piece.view(m.local.shape), alpha=alpha)

    def _pack_updates(self, members: list[_Member], sizes: list[int]) -> torch.Tensor:
        send = torch.empty(sum(sizes), dtype=self.dtype, device=members[0].local.device)
        for m, piece in zip(members, send.split(sizes)):
            self._update_into(piece.view(m.local.shape), m.grad, m.buf)
        return send


def _whole_from_rows(recv: torch.Tensor, owned: list[_Member], world: int, rows: int, cols: int) -> torch.Tensor:
    """The owned matrices, whole and oriented wide, from what every rank sent: rank by rank, its rows of each."""
    x = recv.new_empty(len(owned), rows, cols)
    sizes = [m.row_splits[r] * m.cols for r in range(world) for m in owned]
    pieces = iter(recv.split(sizes))
    for r in range(world):
        for slot, m in enumerate(owned):
            start, stop = m.row_range(r)
            whole = x[slot].mT if m.transposed else x[slot]
            whole[start:stop].copy_(next(pieces).view(stop - start, m.cols))
    return x


def _rows_from_whole(x: torch.Tensor, owned: list[_Member], world: int) -> torch.Tensor:
    """The reverse of `_whole_from_rows`: rank by rank, its rows of each owned result, packed to send."""
    sizes = [m.row_splits[r] * m.cols for r in range(world) for m in owned]
    send = x.new_empty(sum(sizes))
    pieces = iter(send.split(sizes))
    for r in range(world):
        for slot, m in enumerate(owned):
            start, stop = m.row_range(r)
            whole = x[slot].mT if m.transposed else x[slot]
            next(pieces).view(stop - start, m.cols).copy_(whole[start:stop])
    return send


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _stack(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 3 else t.unsqueeze(0)


def _whole_on_each_rank(p: DTensor) -> bool:
    """Replicated, or a (E, rows, cols) stack split only along E: every rank holds whole matrices."""
    # _StridedShard: FSDP's split of an already EP-sharded dim 0 (a Shard subclass before torch 2.13, not since).
    return all(
        pl.is_replicate() or (p.dim() == 3 and isinstance(pl, (Shard, _StridedShard)) and pl.dim == 0)
        for pl in p.placements
    )


def _row_shard_dim(p: DTensor) -> int | None:
    """The mesh dimension a 2-D weight is split by rows over (FSDP's Shard(0)), None for any other split."""
    split = [i for i, pl in enumerate(p.placements) if not pl.is_replicate()]
    if p.dim() != 2 or len(split) != 1:
        return None
    pl = p.placements[split[0]]
    return split[0] if type(pl) is Shard and pl.dim == 0 else None
