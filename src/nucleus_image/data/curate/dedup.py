"""Exact (SHA-256) and perceptual (64-bit pHash) deduplication.

Near-duplicate search is multi-index hashing (Norouzi et al., 2012): the 64 bits are cut into m bands; two
hashes within Hamming distance d agree within floor(d/m) bits on at least one band (pigeonhole), so each hash
only looks up the band keys within that radius of its own, through a per-band lookup table, and candidates
are verified exactly. m is chosen per corpus size by the expected work (`choose_bands`). No pair list over all
N^2 pairs is ever formed; `all_pairs_near` is the brute-force reference the index is tested against.

Survivor rule, applied to each exact group and then to each near-duplicate cluster (connected components of
the near pairs): keep the image with the most pixels, then the largest file (least compressed), then the
earliest in input order. Every other member is rejected with `duplicate_of` naming the survivor's source.
"""

from __future__ import annotations

from itertools import combinations
from math import comb

import numpy as np


def popcount64(x: np.ndarray) -> np.ndarray:
    return np.bitwise_count(x)


def _bands(m: int) -> list[tuple[int, int]]:
    """(shift, bits) of m contiguous bands covering the 64 bits, as even as possible."""
    sizes = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    shifts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return [(int(s), int(b)) for s, b in zip(shifts, sizes)]


def choose_bands(n: int, max_dist: int) -> int:
    """The band count m in [1, max_dist+1] minimising lookups + expected random candidates for n hashes."""
    best, best_cost = max_dist + 1, float("inf")
    for m in range(1, max_dist + 2):
        r = max_dist // m
        bands = _bands(m)
        if max(b for _, b in bands) > 26:  # lookup tables beyond 2**26 entries cost more memory than they save
            continue
        probes = sum(sum(comb(b, i) for i in range(r + 1)) for _, b in bands)
        candidates = sum(n * sum(comb(b, i) for i in range(r + 1)) * n / 2**b for _, b in bands)
        cost = n * probes + candidates + sum(2**b for _, b in bands)
        if cost < best_cost:
            best, best_cost = m, cost
    return best


def near_pairs(hashes: np.ndarray, max_dist: int, bands: int | None = None) -> np.ndarray:
    """All pairs (i, j), i < j, with popcount(h_i ^ h_j) <= max_dist, as an (P, 2) int64 array sorted by i, j."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(h)
    if n < 2:
        return np.zeros((0, 2), np.int64)
    m = bands or choose_bands(n, max_dist)
    if max(b for _, b in _bands(m)) > 26:
        raise ValueError(f"bands={m} gives bands over 26 bits (lookup tables too large); use bands >= 3")
    r = max_dist // m
    found = []
    for shift, bits in _bands(m):
        keys = ((h >> np.uint64(shift)) & np.uint64((1 << bits) - 1)).astype(np.int64)
        order = np.argsort(keys, kind="stable")
        counts = np.bincount(keys, minlength=1 << bits)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        flips = [0] + [sum(1 << b for b in c) for k in range(1, r + 1) for c in combinations(range(bits), k)]
        for flip in flips:
            q = keys ^ flip
            cnt = counts[q]
            hit = np.nonzero(cnt)[0]
            if not len(hit):
                continue
            cnt_hit = cnt[hit]
            qi = np.repeat(hit, cnt_hit)
            first = np.repeat(starts[q[hit]] - (np.cumsum(cnt_hit) - cnt_hit), cnt_hit)
            tj = order[first + np.arange(len(qi))]
            keep = qi < tj
            qi, tj = qi[keep], tj[keep]
            close = popcount64(h[qi] ^ h[tj]) <= max_dist
            found.append(qi[close] * n + tj[close])
    flat = np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)
    return np.stack([flat // n, flat % n], axis=1)


def all_pairs_near(hashes: np.ndarray, max_dist: int, block: int = 2048) -> np.ndarray:
    """Brute-force reference for `near_pairs`: compares every pair, O(N^2)."""
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    out = []
    for start in range(0, len(h), block):
        d = popcount64(h[start : start + block, None] ^ h[None, :])
        i, j = np.nonzero(d <= max_dist)
        i = i + start
        keep = i < j
        out.append(i[keep] * len(h) + j[keep])
    flat = np.sort(np.concatenate(out)) if out else np.zeros(0, np.int64)
    return np.stack([flat // max(len(h), 1), flat % max(len(h), 1)], axis=1)


def _components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label (smallest member index) per node; union-find with path halving."""
    parent = np.arange(n)
    for a, b in pairs.tolist():
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        if a != b:
            parent[max(a, b)] = min(a, b)
    for i in range(n):
        root = i
        while parent[root] != root:
            root = parent[root]
        parent[i] = root
    return parent


def _survivors(groups: np.ndarray, pixels: np.ndarray, nbytes: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per row, the row index of its group's survivor (most pixels, then most bytes, then earliest)."""
    rank = np.lexsort((order, -nbytes, -pixels, groups))  # sorted by group, best first within each
    first = np.ones(len(rank), bool)
    first[1:] = groups[rank][1:] != groups[rank][:-1]
    best_of_group = {}
    for idx in rank[first]:
        best_of_group[groups[idx]] = idx
    return np.array([best_of_group[g] for g in groups], dtype=np.int64)


def deduplicate(
    sha256: list[str], phash: np.ndarray, pixels: np.ndarray, nbytes: np.ndarray, order: np.ndarray, hamming_below: int
) -> tuple[list[str | None], np.ndarray]:
    """(reason per row: None, "duplicate_exact" or "duplicate_near"; survivor row index per row)."""
    n = len(sha256)
    if n == 0:
        return [], np.zeros(0, np.int64)
    _, sha_group = np.unique(np.asarray(sha256, dtype=object).astype(str), return_inverse=True)
    exact_keep = _survivors(sha_group, pixels, nbytes, order)
    reasons: list[str | None] = [None if exact_keep[i] == i else "duplicate_exact" for i in range(n)]
    survivor = exact_keep.copy()
    unique_rows = np.nonzero(exact_keep == np.arange(n))[0]
    pairs = near_pairs(phash[unique_rows], hamming_below - 1)
    labels = _components(len(unique_rows), pairs)
    near_keep = unique_rows[_survivors(labels, pixels[unique_rows], nbytes[unique_rows], order[unique_rows])]
    for row, keep in zip(unique_rows, near_keep):
        if keep != row:
            reasons[row] = "duplicate_near"
            survivor[row] = keep
    # An exact copy of a near-duplicate loser is itself a near duplicate of the cluster's survivor.
    for row in range(n):
        if survivor[survivor[row]] != survivor[row]:
            survivor[row] = survivor[survivor[row]]
            reasons[row] = "duplicate_near"
    return reasons, survivor
