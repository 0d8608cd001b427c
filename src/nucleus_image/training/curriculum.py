"""Curriculum sampling: per-image weights over the manifest's tier (1..5) and bucket (1..8) that each stage sets,
so sampling mass moves toward higher tiers / later buckets across stages while keeping a share of the early
ones; and one caption granularity drawn per sample (with a dropout share trained on the empty prompt, which
classifier-free guidance uses as its negative).

For the synthetic domain the bucket is difficulty (object count), so the tiny preset starts on scenes with few
objects and then spreads to all of them.
"""

from __future__ import annotations

import numpy as np

from .config import StageConfig


def row_weights(tiers: np.ndarray, buckets: np.ndarray, stage: StageConfig) -> np.ndarray:
    """float64 weight per row = tier_weights[tier-1] * bucket_weights[bucket-1] (empty = uniform), normalised
    so the weights of the rows present sum to one."""
    w = np.ones(len(tiers), dtype=np.float64)
    if stage.tier_weights:
        w *= np.asarray(stage.tier_weights, np.float64)[np.asarray(tiers, np.int64) - 1]
    if stage.bucket_weights:
        w *= np.asarray(stage.bucket_weights, np.float64)[np.asarray(buckets, np.int64) - 1]
    if w.sum() <= 0:
        raise ValueError(
            f"stage {stage.name!r} gives every image zero weight (tier_weights={stage.tier_weights}, "
            f"bucket_weights={stage.bucket_weights})"
        )
    return w / w.sum()


def share_by_bucket(weights: np.ndarray, buckets: np.ndarray) -> dict[int, float]:
    """Expected share of samples per manifest bucket under `weights`: what the start-of-stage summary prints."""
    return {int(b): float(weights[buckets == b].sum()) for b in np.unique(buckets)}


def caption_probabilities(caption_weights: tuple[float, ...], n: int) -> np.ndarray:
    """Probabilities over an image's n captions (low to high quality): `caption_weights` truncated to n, or
    extended with its last entry; empty = uniform."""
    if not caption_weights:
        return np.full(n, 1.0 / n)
    w = np.asarray(caption_weights[:n], np.float64)
    if len(w) < n:
        w = np.concatenate([w, np.full(n - len(w), w[-1])])
    if w.sum() <= 0:
        raise ValueError(f"caption_weights {caption_weights} give zero weight to all of an image's {n} captions")
    return w / w.sum()


def pick_caption(
    rng: np.random.Generator, captions: list[str], caption_weights: tuple[float, ...], dropout: float
) -> str:
    """One caption per sample: the empty prompt with probability `dropout`, else one granularity drawn by
    `caption_weights`. Both draws always happen, so the RNG advances the same way whatever is picked."""
    drop = rng.random() < dropout
    index = int(rng.choice(len(captions), p=caption_probabilities(caption_weights, len(captions))))
    return "" if drop else captions[index]
