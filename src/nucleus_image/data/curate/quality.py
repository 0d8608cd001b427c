"""Image statistics, the quality filters (blank, histogram anomalies, blur), the pluggable quality scorer and
the aesthetic tiers A1..A5.

Statistics are measured once per image, in the decode pass, on a copy resized to `analysis_side` (so
thresholds mean the same at any source resolution). The built-in scorer, `ImageStatisticsHeuristicScorer`,
is an honest heuristic over those statistics -- sharpness, contrast, exposure, colourfulness, tonal entropy,
resolution -- mapped onto the 0..10 scale of aesthetic predictors. It has NOT been fitted to human ratings and
does not judge composition or content. For real curation use the built-in learned scorer, a CLIP / SigLIP
aesthetic head (`quality.model`, see `clip_scoring`), or plug any other model:

    class MyAesthetic:                      # any "package.module:Factory" returning an object like this
        name = "laion-aesthetic-v2"
        def score(self, images, stats):    # list of RGB PIL images (longer side analysis_side), list of dicts
            return [...]                    # one float per image, 0..10 like the recipe's thresholds
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from PIL import Image

from nucleus_image.data.curate.config import QualityConfig
from nucleus_image.data.curate.plugins import load_plugin

STAT_NAMES = (
    "lum_mean",
    "lum_std",
    "grey_levels",
    "clip_low",
    "clip_high",
    "entropy",
    "colorfulness",
    "laplacian_var",
    "highfreq_ratio",
)


def analysis_copy(rgb: Image.Image, side: int) -> Image.Image:
    """A copy whose longer side is at most `side` (never upscaled)."""
    w, h = rgb.size
    scale = side / max(w, h)
    if scale >= 1.0:
        return rgb.copy()
    return rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR, reducing_gap=2.0)


def image_statistics(small: Image.Image) -> dict[str, float]:
    """Statistics of an RGB analysis image (see STAT_NAMES). Luminance is Pillow's L (ITU-R 601-2)."""
    rgb = np.asarray(small, dtype=np.float64)
    lum_u8 = np.asarray(small.convert("L"))
    lum = lum_u8.astype(np.float64)
    hist = np.bincount(lum_u8.ravel(), minlength=256) / lum_u8.size
    nz = hist[hist > 0]
    # Laplacian (4-neighbour) variance: low when edges are soft.
    lap = lum[1:-1, :-2] + lum[1:-1, 2:] + lum[:-2, 1:-1] + lum[2:, 1:-1] - 4.0 * lum[1:-1, 1:-1]
    # Share of spectral energy above a quarter of Nyquist: a blur measure less fooled by noise-free flat areas.
    power = np.abs(np.fft.rfft2(lum - lum.mean())) ** 2
    fy = np.fft.fftfreq(lum.shape[0])[:, None]
    fx = np.fft.rfftfreq(lum.shape[1])[None, :]
    radius = np.sqrt(fx**2 + fy**2)
    total = power.sum()
    # Hasler & Suesstrunk (2003) colourfulness.
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    return {
        "lum_mean": float(lum.mean()),
        "lum_std": float(lum.std()),
        "grey_levels": float(np.count_nonzero(hist)),
        "clip_low": float(hist[:3].sum()),
        "clip_high": float(hist[253:].sum()),
        "entropy": float(-(nz * np.log2(nz)).sum()),
        "colorfulness": float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())),
        "laplacian_var": float(lap.var()) if lap.size else 0.0,
        "highfreq_ratio": float(power[radius > 0.125].sum() / total) if total > 0 else 0.0,
    }


def filter_reason(stats: dict[str, float], cfg: QualityConfig) -> tuple[str, str] | None:
    """(reason, detail) for the first filter an image fails, in the order blank, histogram, blur; else None."""
    if stats["lum_std"] < cfg.blank_std:
        return "blank", f"luminance std {stats['lum_std']:.2f} < {cfg.blank_std}"
    clipped = max(stats["clip_low"], stats["clip_high"])
    if clipped > cfg.clip_fraction:
        return "histogram_anomaly", f"{clipped:.1%} of pixels clipped > {cfg.clip_fraction:.0%}"
    if stats["grey_levels"] < cfg.min_grey_levels:
        return "histogram_anomaly", f"{int(stats['grey_levels'])} grey levels < {cfg.min_grey_levels}"
    # Both measures must agree: smooth-but-sharp graphics have a low Laplacian variance yet crisp spectra.
    if stats["laplacian_var"] < cfg.blur_laplacian_min and stats["highfreq_ratio"] < cfg.blur_highfreq_min:
        return "blurry", (
            f"Laplacian variance {stats['laplacian_var']:.1f} < {cfg.blur_laplacian_min} and "
            f"high-frequency energy {stats['highfreq_ratio']:.4f} < {cfg.blur_highfreq_min}"
        )
    return None


class QualityScorer(Protocol):
    name: str

    def score(self, images: list[Image.Image], stats: list[dict[str, float]]) -> list[float]: ...


class ImageStatisticsHeuristicScorer:
    """Heuristic quality score from image statistics only (not a learned aesthetic model): a weighted mean of
    six sub-scores in [0, 1], mapped linearly to 3..8 so the recipe's 5.0 cut keeps images that are sharp,
    contrasty, well exposed and reasonably large, and drops dull, dark or tiny ones."""

    name = "image-statistics-heuristic"
    WEIGHTS = {"sharpness": 0.25, "contrast": 0.2, "exposure": 0.15, "colour": 0.1, "entropy": 0.15, "resolution": 0.15}

    def subscores(self, image: Image.Image, s: dict[str, float], pixels: float) -> dict[str, float]:
        return {
            "sharpness": min(1.0, np.log10(1.0 + s["laplacian_var"]) / 3.0),  # 1000 = crisp at 256 px
            "contrast": min(1.0, s["lum_std"] / 64.0),
            "exposure": 1.0 - abs(s["lum_mean"] - 128.0) / 128.0,
            "colour": min(1.0, s["colorfulness"] / 80.0),
            "entropy": s["entropy"] / 8.0,
            "resolution": float(np.clip(np.log2(np.sqrt(pixels) / 256.0) / 3.0, 0.0, 1.0)),  # 256 px -> 0, 2048 -> 1
        }

    def score(self, images: list[Image.Image], stats: list[dict[str, float]]) -> list[float]:
        out = []
        for image, s in zip(images, stats):
            sub = self.subscores(image, s, s.get("source_pixels", image.width * image.height))
            out.append(3.0 + 5.0 * sum(self.WEIGHTS[k] * v for k, v in sub.items()))
        return out


BUILTIN_SCORERS = {ImageStatisticsHeuristicScorer.name: ImageStatisticsHeuristicScorer}


def load_scorer(spec: str) -> QualityScorer:
    return load_plugin(spec, BUILTIN_SCORERS, "quality scorer")


def tiers(scores: np.ndarray, cfg: QualityConfig) -> np.ndarray:
    """Tier 1..5 (A1..A5) per score from the 4 lower edges of A2..A5; scores below min_score are A1 here and
    rejected by `low_quality` before tiers matter."""
    return (1 + np.searchsorted(np.asarray(cfg.tier_edges), scores, side="right")).astype(np.int8)
