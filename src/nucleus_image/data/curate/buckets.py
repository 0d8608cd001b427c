"""Episodic curriculum buckets B1..B8 by the published softmax rule (REFERENCE.md section 3):

    z = w*q + (1-w)*s,  q = (tier-1)/4,  s = size rank in [0, 1]
    l_k = -(z - mu_k)^2 / (2 sigma^2),  mu = linspace(-1.75, 1.75, 8),  p = softmax(l / T)

Each image draws its bucket from p with a uniform number derived from its partition_key (and the config seed),
so reruns and engines agree. Soft caps: a bucket may hold at most `soft_cap` of the images; the overflow
(the members with the highest second key-derived number) is redrawn, with the same uniform number, among the
buckets not yet full, repeated until none overflows.
"""

from __future__ import annotations

import hashlib

import numpy as np

from nucleus_image.data.curate.config import BucketConfig
from nucleus_image.data.manifest import NUM_BUCKETS


def size_rank(width: np.ndarray, height: np.ndarray, edges: tuple[int, ...]) -> np.ndarray:
    """Rank of sqrt(w*h) among the size edges, scaled to [0, 1]."""
    side = np.sqrt(np.asarray(width, np.float64) * np.asarray(height, np.float64))
    return np.searchsorted(np.asarray(edges, np.float64), side, side="right") / len(edges)


def probabilities(tier: np.ndarray, width: np.ndarray, height: np.ndarray, cfg: BucketConfig) -> np.ndarray:
    """(N, 8) bucket probabilities."""
    q = (np.asarray(tier, np.float64) - 1.0) / 4.0
    z = cfg.quality_weight * q + (1.0 - cfg.quality_weight) * size_rank(width, height, cfg.size_edges)
    mu = np.linspace(-cfg.mu_range, cfg.mu_range, NUM_BUCKETS)
    logits = -((z[:, None] - mu[None, :]) ** 2) / (2.0 * cfg.sigma**2) / cfg.temperature
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def key_uniform(partition_key: np.ndarray, seed: int, salt: str) -> np.ndarray:
    """A uniform number in [0, 1) per key, a pure function of (key, seed, salt)."""
    out = np.empty(len(partition_key), np.float64)
    for i, key in enumerate(np.asarray(partition_key).tolist()):
        digest = hashlib.blake2b(f"{seed}:{salt}:{key}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big") / 2.0**64
    return out


def _draw(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(p, axis=1)
    cdf[:, -1] = 1.0
    return (cdf <= u[:, None]).sum(axis=1)


def assign(
    partition_key: np.ndarray, tier: np.ndarray, width: np.ndarray, height: np.ndarray, cfg: BucketConfig
) -> np.ndarray:
    """Bucket 1..8 (int8) per image."""
    n = len(partition_key)
    if n == 0:
        return np.zeros(0, np.int8)
    p = probabilities(tier, width, height, cfg)
    u = key_uniform(partition_key, cfg.seed, "bucket")
    priority = key_uniform(partition_key, cfg.seed, "cap")
    bucket = _draw(p, u)
    cap = int(np.ceil(cfg.soft_cap * n))
    full = np.zeros(NUM_BUCKETS, bool)
    while True:
        counts = np.bincount(bucket, minlength=NUM_BUCKETS)
        over = np.nonzero(counts > cap)[0]
        if not len(over):
            break
        full[over] = True
        moved = []
        for b in over:
            rows = np.nonzero(bucket == b)[0]
            moved.append(rows[np.lexsort((rows, priority[rows]))][cap:])
        moved = np.concatenate(moved)
        masked = p[moved] * ~full
        # An image whose probability sits entirely on full buckets still needs a home: spread it uniformly.
        masked[masked.sum(axis=1) == 0] = ~full
        bucket[moved] = _draw(masked / masked.sum(axis=1, keepdims=True), u[moved])
    return (bucket + 1).astype(np.int8)
