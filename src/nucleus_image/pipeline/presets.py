"""Aspect-ratio presets: the released model's ~1 MP sizes (1:1 = 1024x1024, 16:9 = 1344x768, ...), and the
same shapes scaled to a small model's native resolution.

A preset keeps the area of a `base` x `base` square: the short side is rounded to a multiple of `step`
(base / 16, at least the model's pixel granularity) and the long side is the largest such multiple not above
short * ratio. At base 1024 that reproduces the familiar ~1 MP table.

    python -c "from nucleus_image.pipeline.presets import preset_sizes; print(preset_sizes(1024, 16))"
"""

from __future__ import annotations

import math
from numbers import Real

ASPECT_RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3")


def _parse(aspect: str) -> tuple[int, int]:
    if aspect not in ASPECT_RATIOS:
        raise ValueError(f"unknown aspect_ratio {aspect!r}; accepted: {', '.join(ASPECT_RATIOS)}")
    w, h = aspect.split(":")
    return int(w), int(h)


def preset_size(aspect: str, base: int, granularity: int) -> tuple[int, int]:
    """(width, height) for `aspect` at about base*base pixels, both multiples of the model's granularity."""
    rw, rh = _parse(aspect)
    if base < granularity or base % granularity:
        raise ValueError(f"base resolution {base} must be a positive multiple of the pixel granularity {granularity}")
    step = max(granularity, base // 16 // granularity * granularity)
    ratio = max(rw, rh) / min(rw, rh)
    short = max(step, round(base / math.sqrt(ratio) / step) * step)
    long = max(short, math.floor(short * ratio / step) * step)
    return (long, short) if rw >= rh else (short, long)


def preset_sizes(base: int, granularity: int) -> dict[str, tuple[int, int]]:
    return {aspect: preset_size(aspect, base, granularity) for aspect in ASPECT_RATIOS}


def resolve_size(
    height: int | None, width: int | None, aspect_ratio: str | None, base: int, granularity: int
) -> tuple[int, int]:
    """(height, width) in pixels: an aspect preset, or explicit sizes (`base` for a missing one), each checked to
    be a positive multiple of the model's pixel granularity."""
    if aspect_ratio is not None:
        _parse(aspect_ratio)
        if height is not None or width is not None:
            raise ValueError(f"pass aspect_ratio ({aspect_ratio!r}) or height/width, not both")
        width, height = preset_size(aspect_ratio, base, granularity)
    height = base if height is None else height
    width = base if width is None else width
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % granularity:
            near = (
                max(granularity, round(value / granularity) * granularity)
                if isinstance(value, Real) and value > 0
                else granularity
            )
            raise ValueError(
                f"{name} {value!r} is not a positive multiple of {granularity} px (this model's "
                f"autoencoder factor x patch size); nearest accepted: {near}"
            )
    return height, width
