"""Multi-aspect bucketing from step zero: every batch comes from one aspect bucket, so no image is padded or
squashed and every batch has one static shape.

A stage's buckets share its pixel area (resolution^2) at several aspect ratios, each side a multiple of the
model's pixel granularity (autoencoder factor x patch size). Each image joins the bucket nearest its own
aspect ratio (in log ratio) and is resized to cover the bucket, then centre-cropped. A batch first picks a
bucket, with probability proportional to the curriculum weight it holds, then draws its images inside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import parse_ratio


@dataclass(frozen=True)
class AspectBucket:
    ratio: str
    width: int
    height: int


def make_buckets(resolution: int, aspect_ratios: tuple[str, ...], multiple: int) -> list[AspectBucket]:
    """Buckets of about resolution^2 pixels with sides that are multiples of `multiple`. Small images leave few
    such sides, so each bucket is the candidate that best keeps the ratio first (a wrong ratio crops objects
    out of the picture) and the area second: cost = 2*|log ratio error| + |log area error|. Duplicates after
    rounding are dropped."""
    buckets: list[AspectBucket] = []
    for ratio in aspect_ratios:
        r = parse_ratio(ratio)
        sides = range(multiple, 4 * resolution + 1, multiple)
        best = min(
            (2 * abs(math.log(w / h / r)) + abs(math.log(w * h / resolution**2)), w, h) for w in sides for h in sides
        )
        if all((b.width, b.height) != best[1:] for b in buckets):
            buckets.append(AspectBucket(ratio, best[1], best[2]))
    return buckets


def assign_buckets(widths: np.ndarray, heights: np.ndarray, buckets: list[AspectBucket]) -> np.ndarray:
    """Index of the bucket whose aspect ratio is nearest each image's, in log space (so 2:1 and 1:2 are
    equally far from 1:1)."""
    image_log = np.log(np.asarray(widths, np.float64) / np.asarray(heights, np.float64))
    bucket_log = np.log(np.array([b.width / b.height for b in buckets]))
    return np.abs(image_log[:, None] - bucket_log[None, :]).argmin(axis=1)


def draw_batch(
    rng: np.random.Generator, bucket_of_row: np.ndarray, row_weights: np.ndarray, num_buckets: int, batch_size: int
) -> tuple[int, np.ndarray]:
    """(bucket index, row indices): one bucket by its share of the weight, then `batch_size` rows inside it
    by weight, without replacement when the bucket holds enough rows."""
    mass = np.bincount(bucket_of_row, weights=row_weights, minlength=num_buckets)
    if mass.sum() <= 0:
        raise ValueError("no image has a positive sampling weight in this stage; check tier_weights / bucket_weights")
    bucket = int(rng.choice(num_buckets, p=mass / mass.sum()))
    rows = np.flatnonzero((bucket_of_row == bucket) & (row_weights > 0))
    p = row_weights[rows] / row_weights[rows].sum()
    chosen = rng.choice(rows, size=batch_size, replace=len(rows) < batch_size, p=p)
    return bucket, chosen


def readable_image(path: Path) -> bool:
    """Whether PIL can identify the file and its header is intact (no full decode)."""
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def fit_image(path: Path, width: int, height: int) -> torch.Tensor:
    """Resize to cover width x height (box filter down, bicubic up), then centre-crop; uint8 (3, H, W)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(width / im.width, height / im.height)
        size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.BOX if scale < 1 else Image.Resampling.BICUBIC)
        left, top = (im.width - width) // 2, (im.height - height) // 2
        im = im.crop((left, top, left + width, top + height))
        return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)
