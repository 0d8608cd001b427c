"""Step caches: skip transformer work that barely changes between denoising steps.

Two policies, applied from outside the model through its `block_stack` seam (the model code stays plain):

- First-Block-Cache (`fbcache`, as in ParaAttention / cache-dit): every step runs the first block; when its
  residual (output - input) changed by less than `threshold` (mean |change| / mean |reference|, relative to the
  residual at the row's last full step), the remaining blocks are skipped and their residual from that last full
  step is added to the first block's output instead.
- TaylorSeer (`taylorseer`): the whole stack runs every `interval` steps, counted from the last warmup step; in
  between, the stack's residual is forecast by extrapolating the last `order` + 1 full steps' residuals (Newton
  divided differences in the step index, so the forecast is exact for residuals polynomial in the step, of
  degree `order`).

Both always compute the first `warmup` steps and the last step in full. With `threshold` 0 (fbcache) or
`interval` 1 (taylorseer) every step runs in full and the images equal the uncached sampler's bit for bit.

State and decisions are per batch row: each CFG row (conditional and unconditional separately) of each image
keeps its own residuals and, under fbcache, decides on its own change. A row that skips uses its own cache even
when a batch mate computes, so an image does not depend on what it was batched with (up to the float summation
order that batch size changes anyway). Rows that compute are gathered and run alone, so work saved per row is
work saved. The one host sync is fbcache's per-step decision (which rows compute: control flow on the host);
taylorseer's schedule is fixed in advance and its steps never sync.

    pipe("a red cube", cache="fbcache")                                  # the default thresholds
    pipe("a red cube", cache=TaylorSeerConfig(order=1, interval=3, warmup=2))   # or a typed config
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

CACHE_POLICIES = ("fbcache", "taylorseer")


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"step cache {name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class FBCacheConfig:
    """First-Block-Cache: skip blocks 1.. when the first block's residual changed less than `threshold`
    (relative mean absolute change since the row's last full step); the first `warmup` steps run in full.
    No threshold that saves work kept the score loss's upper 95% bound within 0.03 on the `make demo` model
    (111 prompts x 8, 16 steps): the default 0.15 saves 1.51x block work at a loss of +0.026 [+0.010, +0.044]
    (docs/generation.md); TaylorSeer is the measured pick."""

    threshold: float = 0.15
    warmup: int = 1

    policy = "fbcache"

    def __post_init__(self) -> None:
        if (
            isinstance(self.threshold, bool)
            or not isinstance(self.threshold, (int, float))
            or not math.isfinite(self.threshold)
            or self.threshold < 0
        ):
            raise ValueError(f"fbcache threshold must be a finite number >= 0, got {self.threshold!r}")
        _check_int("warmup", self.warmup, 1)

    def to_dict(self) -> dict:
        return {"policy": self.policy, **dataclasses.asdict(self)}

    def build(self, num_steps: int, rows: int, num_blocks: int) -> FBCache:
        return FBCache(self, num_steps, rows, num_blocks)


@dataclass(frozen=True)
class TaylorSeerConfig:
    """TaylorSeer: full computation every `interval` steps after `warmup` full ones; other steps forecast the
    block stack's residual from the last `order` + 1 full steps. The default is the benchmark's pick on the
    `make demo` model, the largest saving whose score loss's upper 95% bound is within 0.03 (111 prompts x 8, 16
    steps): 2.29x less block work at a loss of +0.011 [-0.001, +0.024] on seeds the pick never saw
    (docs/generation.md)."""

    order: int = 1
    interval: int = 3
    warmup: int = 2

    policy = "taylorseer"

    def __post_init__(self) -> None:
        _check_int("order", self.order, 0)
        _check_int("interval", self.interval, 1)
        _check_int("warmup", self.warmup, 1)

    def to_dict(self) -> dict:
        return {"policy": self.policy, **dataclasses.asdict(self)}

    def build(self, num_steps: int, rows: int, num_blocks: int) -> TaylorSeer:
        return TaylorSeer(self, num_steps, rows, num_blocks)


StepCacheConfig = FBCacheConfig | TaylorSeerConfig
_CONFIGS = {"fbcache": FBCacheConfig, "taylorseer": TaylorSeerConfig}


def cache_config(policy: str, **fields) -> StepCacheConfig:
    """A policy's config from its name and any fields to override (None leaves a field at its default)."""
    if policy not in _CONFIGS:
        raise ValueError(f"unknown cache policy {policy!r}; accepted: {', '.join(CACHE_POLICIES)} (or None)")
    cls = _CONFIGS[policy]
    names = {f.name for f in dataclasses.fields(cls)}
    given = {k: v for k, v in fields.items() if v is not None}
    unknown = sorted(set(given) - names)
    if unknown:
        raise ValueError(f"cache policy {policy!r} takes {', '.join(sorted(names))}; got {', '.join(unknown)}")
    return cls(**given)


def resolve_cache(cache) -> StepCacheConfig | None:
    """None, a policy name (its default config) or a config."""
    if cache is None or isinstance(cache, (FBCacheConfig, TaylorSeerConfig)):
        return cache
    if isinstance(cache, str):
        return cache_config(cache)
    raise ValueError(f"cache must be None, one of {', '.join(CACHE_POLICIES)} or a step cache config, got {cache!r}")


def run_blocks(blocks, start: int, x, temb, img_rot, text_kv, mask, rows: torch.Tensor | None = None):
    """Blocks [start, end) on all rows, or on the rows listed in `rows` (x already holds just those)."""
    if rows is not None:
        temb = temb[rows]
        mask = None if mask is None else mask[rows]
    for i in range(start, len(blocks)):
        k, v = text_kv.keys[i], text_kv.values[i]
        if rows is not None:
            k, v = k[rows], v[rows]
        x, _ = blocks[i](x, temb, img_rot, k, v, mask)
    return x


class _StepCache(ABC):
    """Per-call state: one instance per pipeline call, so nothing carries over between calls. Subclasses give
    `stack` (the block stack for one step) and `row_work` (share of uncached block work for a row's full steps)."""

    def __init__(self, config: StepCacheConfig, num_steps: int, rows: int, num_blocks: int):
        self.config, self.num_steps, self.rows, self.num_blocks = config, num_steps, rows, num_blocks
        self.full_steps_R = [0] * rows

    def forced(self, step: int) -> bool:
        return step < self.config.warmup or step == self.num_steps - 1

    @abstractmethod
    def stack(self, step: int, blocks, x, temb, img_rot, text_kv, mask) -> torch.Tensor:
        """The block stack's output for denoising step `step` (the model's `block_stack` signature plus the step)."""

    @abstractmethod
    def row_work(self, full_steps: int) -> float:
        """Share of the uncached block work a row does when `full_steps` of its steps run in full."""

    def block_stack(self, step: int):
        """The model's `block_stack` for denoising step `step`."""
        return lambda blocks, x, temb, img_rot, text_kv, mask: self.stack(step, blocks, x, temb, img_rot, text_kv, mask)

    def image_reports(self, images: int) -> list[dict]:
        """Per image: the config, and per CFG row how many steps ran the whole stack and the share of the
        uncached block work done (rows [0, images) conditional, then the unconditional ones if any)."""
        reports = []
        for b in range(images):
            names = ("conditional", "unconditional")[: self.rows // images]
            full = {name: self.full_steps_R[b + k * images] for k, name in enumerate(names)}
            reports.append(
                {
                    **self.config.to_dict(),
                    "steps": self.num_steps,
                    "full_steps": full,
                    "block_work": sum(self.row_work(n) for n in full.values()) / len(full),
                }
            )
        return reports


class FBCache(_StepCache):
    config: FBCacheConfig

    def __init__(self, config: FBCacheConfig, num_steps: int, rows: int, num_blocks: int):
        super().__init__(config, num_steps, rows, num_blocks)
        self.first_RSD: torch.Tensor | None = None  # first block's residual at each row's last full step
        self.rest_RSD: torch.Tensor | None = None  # blocks 1..'s residual at each row's last full step

    def row_work(self, full_steps: int) -> float:
        """Every step runs the first block; full steps run the others too."""
        return (self.num_steps + (self.num_blocks - 1) * full_steps) / (self.num_steps * self.num_blocks)

    def stack(self, step, blocks, x, temb, img_rot, text_kv, mask):
        h, _ = blocks[0](x, temb, img_rot, text_kv.keys[0], text_kv.values[0], mask)
        first_RSD = h - x
        if self.first_RSD is None or self.forced(step):
            compute = [True] * self.rows
        else:
            change_R = (first_RSD - self.first_RSD).float().abs().mean(dim=(1, 2)) / self.first_RSD.float().abs().mean(
                dim=(1, 2)
            )
            # The host sync: which rows run the remaining blocks is control flow. A 0/0 change (NaN) computes.
            compute = (~(change_R < self.config.threshold)).tolist()
        for r, c in enumerate(compute):
            self.full_steps_R[r] += c
        if all(compute):
            out = run_blocks(blocks, 1, h, temb, img_rot, text_kv, mask)
            self.first_RSD, self.rest_RSD = first_RSD, out - h
            return out
        first_ref, rest_ref = self.first_RSD, self.rest_RSD
        assert first_ref is not None and rest_ref is not None  # the first step always runs in full
        out = h + rest_ref
        if any(compute):
            rows = torch.tensor([r for r, c in enumerate(compute) if c], device=x.device)
            fresh = run_blocks(blocks, 1, h[rows], temb, img_rot, text_kv, mask, rows)
            out[rows] = fresh
            first_ref[rows] = first_RSD[rows]
            rest_ref[rows] = fresh - h[rows]
        return out


class TaylorSeer(_StepCache):
    config: TaylorSeerConfig

    def __init__(self, config: TaylorSeerConfig, num_steps: int, rows: int, num_blocks: int):
        super().__init__(config, num_steps, rows, num_blocks)
        self.history: list[tuple[int, torch.Tensor]] = []  # (step, stack residual) of the last order+1 full steps

    def is_full(self, step: int) -> bool:
        return self.forced(step) or (step - self.config.warmup + 1) % self.config.interval == 0

    def row_work(self, full_steps: int) -> float:
        return full_steps / self.num_steps

    def stack(self, step, blocks, x, temb, img_rot, text_kv, mask):
        if self.is_full(step):
            out = run_blocks(blocks, 0, x, temb, img_rot, text_kv, mask)
            self.history = (self.history + [(step, out - x)])[-(self.config.order + 1) :]
            self.full_steps_R = [n + 1 for n in self.full_steps_R]
            return out
        return x + extrapolate(self.history, step)


def extrapolate(points: list[tuple[int, torch.Tensor]], step: int) -> torch.Tensor:
    """Value at `step` of the polynomial through `points` (oldest first), in Newton's divided-difference form:
    f[s0] + f[s0,s1](s - s0) + f[s0,s1,s2](s - s0)(s - s1) + ... One point reuses it unchanged (order 0)."""
    steps = [s for s, _ in points]
    table = [value for _, value in points]
    out, weight = table[0], 1.0
    for level in range(1, len(points)):
        table = [(table[j + 1] - table[j]) / (steps[j + level] - steps[j]) for j in range(len(table) - 1)]
        weight *= step - steps[level - 1]
        out = out + weight * table[0]
    return out
