"""Counts and histograms of a curated manifest version: what each stage rejected and why, tiers, buckets.

    nucleus data stats dataset/          # prints the report, writes dataset/manifest-vNNNN/stats/*.png

Counts add up by construction: inputs = kept + rejected, and the stage funnel subtracts each stage's rejects.
Charts are drawn with Pillow (no plotting dependency).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nucleus_image.data.manifest import NUM_BUCKETS, NUM_TIERS, REJECT_STAGES, read_manifest, read_rejects


def collect_from(root: str | Path) -> dict:
    """Counts for the newest manifest version under root (or the version folder itself)."""
    manifest, rejects = read_manifest(root), read_rejects(root)
    kept, rejected = manifest.num_rows, rejects.num_rows
    by_stage = Counter(rejects.column("stage").to_pylist())
    funnel, remaining = [], kept + rejected
    for stage in REJECT_STAGES:
        remaining -= by_stage.get(stage, 0)
        funnel.append({"stage": stage, "rejected": by_stage.get(stage, 0), "remaining": remaining})
    routes: Counter = Counter()
    for text in manifest.column("annotations").to_pylist():
        routes.update(c["route"] for c in json.loads(text or "{}").get("curation", {}).get("captions", []))
    generated = sum(s.startswith("vlm:") for sources in manifest.column("caption_sources").to_pylist() for s in sources)
    tiers = Counter(manifest.column("tier").to_pylist())
    buckets = Counter(manifest.column("bucket").to_pylist())
    return {
        "inputs": kept + rejected,
        "kept": kept,
        "rejected": rejected,
        "funnel": funnel,
        "reasons": dict(sorted(Counter(rejects.column("reason").to_pylist()).items())),
        "tiers": {f"A{t}": tiers.get(t, 0) for t in range(1, NUM_TIERS + 1)},
        "buckets": {f"B{b}": buckets.get(b, 0) for b in range(1, NUM_BUCKETS + 1)},
        # Captions of kept images by route (synthesize: scored below captions.synthesize_below and dropped),
        # and how many of the manifest's captions a captioner wrote.
        "captions": {**{r: routes.get(r, 0) for r in ("keep", "refine", "synthesize")}, "generated": generated},
    }


def format_report(c: dict) -> str:
    def pct(n: int) -> str:
        return f"{100.0 * n / c['inputs']:5.1f}%" if c["inputs"] else "    -"

    lines = [
        f"inputs {c['inputs']}   kept {c['kept']} ({pct(c['kept']).strip()})   rejected {c['rejected']}",
        "",
        "stage        rejected   remaining",
    ]
    lines += [f"{f['stage']:<12} {f['rejected']:>8}   {f['remaining']:>9}" for f in c["funnel"]]
    lines += ["", "reason               count"]
    lines += [f"{r:<20} {n:>6} {pct(n)}" for r, n in c["reasons"].items()] or ["(none)"]
    lines += ["", "tier  count   (A1 lowest .. A5 best)", *[f"{t:<5} {n:>5}" for t, n in c["tiers"].items()]]
    lines += ["", "bucket count", *[f"{b:<6} {n:>5}" for b, n in c["buckets"].items()]]
    if "captions" in c:
        k = c["captions"]
        lines += [
            "",
            f"captions  keep {k['keep']}   refine {k['refine']}   below threshold (dropped) {k['synthesize']}   "
            f"written by the captioner {k['generated']}",
        ]
    return "\n".join(lines)


def bar_chart(title: str, labels: list[str], values: list[float], path: Path, width: int = 640) -> Path:
    """A labelled horizontal bar chart as PNG (one row per label, the count at the bar's end)."""
    row, top, left = 18, 28, 8 + 7 * max((len(str(label)) for label in labels), default=4)
    img = Image.new("RGB", (width, top + row * max(len(values), 1) + 10), "white")
    draw = ImageDraw.Draw(img)
    draw.text((8, 8), title, fill="black")
    peak = max(values) if values and max(values) > 0 else 1
    span = width - left - 60
    for i, (label, value) in enumerate(zip(labels, values)):
        y = top + i * row
        draw.text((8, y + 2), str(label), fill="black")
        draw.rectangle([left, y + 2, left + max(1, round(span * value / peak)), y + row - 3], fill=(70, 110, 180))
        draw.text((left + round(span * value / peak) + 6, y + 2), f"{value:g}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _histogram(values: np.ndarray, bins: int) -> tuple[list[str], list[float]]:
    """Counts over at most `bins` equal bins, each labelled by its range with just enough decimals that no two
    labels read the same (one label per value when there are few distinct values)."""
    if not len(values):
        return [], []
    distinct = np.unique(values)
    if len(distinct) <= bins:
        return [f"{v:g}" for v in distinct], [int((values == v).sum()) for v in distinct]
    counts, edges = np.histogram(values, bins=bins)
    for decimals in range(0, 7):
        labels = [f"{a:.{decimals}f}-{b:.{decimals}f}" for a, b in zip(edges[:-1], edges[1:])]
        if len(set(labels)) == len(labels):
            break
    return labels, counts.tolist()


def _tier_label(tier: str) -> str:
    return {"A1": "A1 (lowest)", f"A{NUM_TIERS}": f"A{NUM_TIERS} (best)"}.get(tier, tier)


def write_charts(root: str | Path, out_dir: str | Path) -> list[Path]:
    """PNG charts: quality score, image size, captions per image, tiers, buckets, reject reasons."""
    manifest, counts, out = read_manifest(root), collect_from(root), Path(out_dir)
    score = np.asarray(manifest.column("quality_score"), np.float64)
    side = np.sqrt(np.asarray(manifest.column("width"), np.float64) * np.asarray(manifest.column("height"), np.float64))
    n_caps = np.array([len(c) for c in manifest.column("captions").to_pylist()])
    charts = [
        ("quality_score.png", "quality score (kept images)", *_histogram(score, 20)),
        ("image_size.png", "sqrt(width*height) px (kept images)", *_histogram(side, 20)),
        (
            "captions_per_image.png",
            "captions per image",
            [str(k) for k in range(1, int(n_caps.max(initial=1)) + 1)],
            [int((n_caps == k).sum()) for k in range(1, int(n_caps.max(initial=1)) + 1)],
        ),
        (
            "tiers.png",
            "quality tiers (A1 lowest, A5 best)",
            [_tier_label(t) for t in counts["tiers"]],
            list(counts["tiers"].values()),
        ),
        ("buckets.png", "episodic buckets", list(counts["buckets"]), list(counts["buckets"].values())),
        ("reject_reasons.png", "rejections by reason", list(counts["reasons"]), list(counts["reasons"].values())),
    ]
    return [bar_chart(title, labels, values, out / name) for name, title, labels, values in charts]
