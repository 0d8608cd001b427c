"""A claim's picture: the arms' scores with their intervals beside their loss curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(30, 80, 200), (200, 60, 30), (40, 150, 60), (150, 60, 170), (220, 150, 20)]


def claim_picture(rows: list[dict], losses: dict[str, list[list[float]]], path: Path) -> Path:
    """Left: each arm's mean overall score with its 95% interval over seeds. Right: each trained arm's loss
    (mean over seeds, moving average, log scale)."""
    width, height = 1000, 420
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    # Scores.
    left, right, top, bottom = 60, 440, 40, height - 60
    values = [(r["overall"], r["overall_half"]) for r in rows]
    finite = [v + (h if math.isfinite(h) else 0) for v, h in values if math.isfinite(v)]
    hi = max(finite + [0.05]) * 1.1
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 10), "overall compositional score (95% t over seeds)", fill="black")
    for frac in (0.0, 0.5, 1.0):
        draw.text((5, bottom - (bottom - top) * frac - 6), f"{hi * frac:.3f}", fill="black")
    step = (right - left) / max(len(rows), 1)
    for i, (r, (v, h)) in enumerate(zip(rows, values)):
        x, colour = left + step * (i + 0.5), PALETTE[i % len(PALETTE)]
        if not math.isfinite(v):
            continue
        y = bottom - (bottom - top) * v / hi
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        if math.isfinite(h):
            y0, y1 = bottom - (bottom - top) * max(v - h, 0) / hi, bottom - (bottom - top) * min(v + h, hi) / hi
            draw.line([(x, y0), (x, y1)], fill=colour, width=2)
            draw.line([(x - 6, y0), (x + 6, y0)], fill=colour)
            draw.line([(x - 6, y1), (x + 6, y1)], fill=colour)
        draw.text((x - step / 2 + 4, bottom + 6 + 12 * (i % 2)), r["label"][:22], fill=colour)
    # Losses.
    left, right = 520, width - 20
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 10), "training loss (mean over seeds, moving average)", fill="black")
    curves = {}
    for label, runs in losses.items():
        if not runs:
            continue
        n = min(len(r) for r in runs)
        v = np.nanmean(np.array([r[:n] for r in runs], dtype=np.float64), axis=0)
        v = np.where(np.isfinite(v) & (v > 0), v, np.nanmedian(v))
        window = max(1, n // 50)
        curves[label] = np.convolve(v, np.ones(window) / window, mode="valid")
    if curves:
        lo = math.log10(min(c.min() for c in curves.values()))
        top_log = max(math.log10(max(c.max() for c in curves.values())), lo + 1e-3)
        steps = max(len(c) for c in curves.values())
        for frac in (0.0, 0.5, 1.0):
            draw.text(
                (left - 50, bottom - (bottom - top) * frac - 6),
                f"{10 ** (lo + frac * (top_log - lo)):.3f}",
                fill="black",
            )
        labels = [r["label"] for r in rows]
        for k, (label, c) in enumerate(curves.items()):
            colour = PALETTE[labels.index(label) % len(PALETTE)] if label in labels else (0, 0, 0)
            pts = [
                (
                    left + (right - left) * i / max(steps - 1, 1),
                    bottom - (bottom - top) * (math.log10(y) - lo) / (top_log - lo),
                )
                for i, y in enumerate(c)
            ]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            draw.text((left + 8, top + 6 + 12 * k), label, fill=colour)
        draw.text((right - 70, bottom + 6), f"step {steps}", fill="black")
    img.save(path)
    return path
