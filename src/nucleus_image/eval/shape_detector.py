"""An exact detector for the synthetic shapes domain (`nucleus_image.data.synthetic`): the compositional
scorer's stand-in for GenEval's Mask2Former + CLIP colour classifier.

1. Background: the median of a 2-pixel border frame (scenes keep objects off the border).
2. Colour: each pixel is explained as a mix of the background b and one palette colour c, p ~ b + a (c - b).
   A pixel belongs to c when its coverage a >= 0.5 and its distance from that line is the smallest among the
   palette and within tolerance. Blurred edges, which are such mixes, therefore go to their own colour (never to
   a tint-like neighbour) and the 50% contour of a blurred shape is its true outline.
3. Objects: per colour, connected components; specks dropped before a small closing joins fragments of one
   object (so noise cannot be closed into blobs); then components too small or too thin (blur halos, lines)
   are dropped.
4. Shape: soft IoU of the component's coverage with each shape's template, drawn by the generator's own code
   into the component's box (and slightly larger boxes, at a few blurs, since blur shortens points); the best
   shape counts if it clears `min_match`, and that IoU is the detection's confidence.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from nucleus_image.data.synthetic import COLORS, SHAPES, draw_shape


@dataclass(frozen=True)
class DetectorConfig:
    """Tolerances; lengths and areas are relative to the image's short side so one setting serves 32-1024 px."""

    min_coverage: float = 0.5  # share of the way from background to the colour a pixel must reach
    max_residual: float = 80.0  # RGB distance from the background-to-colour line
    min_area: float = 0.004  # component area / short side^2 (the smallest generated star is ~0.014)
    speck_area: float = 0.001  # raw fragments below this are noise and never merged
    min_thickness: float = 0.018  # inradius / short side: blur halos and thin lines are thinner
    merge_radius: float = 0.015  # closing radius / short side joining fragments of one object
    min_match: float = 0.7  # soft template IoU needed to call a component a shape
    max_aspect: float = 2.0  # generated shapes have square boxes; far longer components are not shapes
    max_side: int = 256  # larger images are downscaled to this short side first: same answer, far less work
    blur_sigmas: tuple[float, ...] = (0.0, 0.008, 0.016)  # template blurs tried, / short side


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)
    area: int
    score: float  # IoU with the shape's template

    def to_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "bbox": [round(v, 1) for v in self.bbox],
                "area": self.area, "score": round(self.score, 3)}


_PALETTE_KC = np.asarray(list(COLORS.values()), dtype=np.float32)
_COLOR_NAMES = tuple(COLORS)


def as_rgb_array(image) -> np.ndarray:
    """H x W x 3 float32 from a PIL image, a path, or a uint8 array."""
    if isinstance(image, np.ndarray):
        arr = image
    else:
        if not isinstance(image, Image.Image):
            image = Image.open(image)
        arr = np.asarray(image.convert("RGB"))
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image array of shape {arr.shape} is not H x W x 3 RGB")
    return arr.astype(np.float32)


def estimate_background(rgb_HWC: np.ndarray) -> np.ndarray:
    border = np.concatenate([rgb_HWC[:2].reshape(-1, 3), rgb_HWC[-2:].reshape(-1, 3),
                             rgb_HWC[:, :2].reshape(-1, 3), rgb_HWC[:, -2:].reshape(-1, 3)])
    return np.median(border, axis=0)


def color_labels(rgb_HWC: np.ndarray, background: np.ndarray,
                 config: DetectorConfig) -> tuple[np.ndarray, np.ndarray]:
    """Palette index per pixel (-1 for background or unexplained pixels) and each pixel's coverage per colour."""
    v_HWC = rgb_HWC - background
    d_KC = _PALETTE_KC - background
    dd_K = np.maximum((d_KC * d_KC).sum(-1), 1.0)
    vd_HWK = v_HWC @ d_KC.T
    coverage_HWK = vd_HWK / dd_K
    # Distance from the line b + a (c - b): |v|^2 - (v.d)^2 / |d|^2, without materialising projections.
    resid2_HWK = np.maximum((v_HWC * v_HWC).sum(-1, keepdims=True) - vd_HWK * coverage_HWK, 0.0)
    resid2_HWK[coverage_HWK < config.min_coverage] = np.inf
    best_HW = resid2_HWK.argmin(-1)
    best_resid2 = np.take_along_axis(resid2_HWK, best_HW[..., None], -1)[..., 0]
    return np.where(best_resid2 <= config.max_residual**2, best_HW, -1), coverage_HWK


@lru_cache(maxsize=8192)
def _template(shape: str, window: tuple[int, int], box: tuple[float, float, float, float], sigma: float) -> np.ndarray:
    """Anti-aliased coverage (0..1) of `shape` filling `box` inside a window (h, w), blurred by sigma pixels."""
    ss = 4
    h, w = window
    canvas = Image.new("L", (w * ss, h * ss))
    draw_shape(ImageDraw.Draw(canvas), shape, tuple(v * ss for v in box), 255)
    cov = np.asarray(canvas.reduce(ss), dtype=np.float32) / 255.0
    return ndimage.gaussian_filter(cov, sigma) if sigma > 0 else cov


def classify_shape(coverage_HW: np.ndarray, box: tuple[float, float, float, float],
                   sigmas: tuple[float, ...]) -> tuple[str, float]:
    """Best shape for a component's coverage window and its soft IoU (sum of minima over sum of maxima).
    Each shape is tried at a few blurs and slightly enlarged boxes: blur rounds corners and shortens points, so
    the 50% contour's box is the true box only for blunt shapes."""
    x0, y0, x1, y1 = box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    window = coverage_HW.shape
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        for grow in (1.0, 1.1, 1.2):
            tbox = tuple(round(v, 1) for v in (cx - hw * grow, cy - hh * grow, cx + hw * grow, cy + hh * grow))
            for sigma in sigmas:
                tpl = _template(shape, window, tbox, sigma)
                iou = float(np.minimum(tpl, coverage_HW).sum() / max(np.maximum(tpl, coverage_HW).sum(), 1e-6))
                if iou > best_iou:
                    best, best_iou = shape, iou
    return best, best_iou


def detect(image, config: DetectorConfig = DetectorConfig()) -> list[Detection]:
    """Shapes in one image, most confident first (the order GenEval's rules read detections in). Images with a
    short side above `max_side` are box-downscaled first (tolerances are relative; boxes are reported in the
    original pixels)."""
    rgb = as_rgb_array(image)
    scale = min(rgb.shape[:2]) / config.max_side
    if scale > 1:
        size = (round(rgb.shape[1] / scale), round(rgb.shape[0] / scale))
        rgb = np.asarray(Image.fromarray(rgb.astype(np.uint8)).resize(size, Image.BOX), dtype=np.float32)
        return [Detection(d.shape, d.color, tuple(v * scale for v in d.bbox), round(d.area * scale * scale), d.score)
                for d in _detect(rgb, config)]
    return _detect(rgb, config)


def _detect(rgb: np.ndarray, config: DetectorConfig) -> list[Detection]:
    short = min(rgb.shape[:2])
    labels, coverage_HWK = color_labels(rgb, estimate_background(rgb), config)
    coverage_HWK = np.clip(coverage_HWK, 0.0, 1.0)
    sigmas = tuple(round(f * short, 2) for f in config.blur_sigmas)
    eight = np.ones((3, 3), dtype=bool)
    radius = max(1, int(round(config.merge_radius * short)))
    disk = np.hypot(*np.mgrid[-radius:radius + 1, -radius:radius + 1]) <= radius + 0.5
    detections = []
    for k, name in enumerate(_COLOR_NAMES):
        mask = labels == k
        if not mask.any():
            continue
        comp, n = ndimage.label(mask, structure=eight)
        sizes = ndimage.sum_labels(mask, comp, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes >= config.speck_area * short * short) + 1
        mask = np.isin(comp, keep)
        if not mask.any():
            continue
        # Pad before closing so objects at the border are not eroded by the implicit outside.
        padded = np.pad(mask, radius)
        mask = ndimage.binary_closing(padded, structure=disk)[radius:-radius, radius:-radius] | mask
        comp, n = ndimage.label(mask, structure=eight)
        for idx, sl in enumerate(ndimage.find_objects(comp), start=1):
            region = comp[sl] == idx
            area = int(region.sum())
            h, w = region.shape
            if area < config.min_area * short * short or max(h, w) > config.max_aspect * min(h, w):
                continue
            inradius = ndimage.distance_transform_edt(np.pad(region, 1)).max()
            if inradius < max(1.0, config.min_thickness * short):
                continue
            bbox = (float(sl[1].start), float(sl[0].start), float(sl[1].stop), float(sl[0].stop))
            # A window around the component holding only this component's coverage of this colour.
            pad = max(2, int(0.3 * max(h, w)))
            wy = slice(max(0, sl[0].start - pad), sl[0].stop + pad)
            wx = slice(max(0, sl[1].start - pad), sl[1].stop + pad)
            others = (comp[wy, wx] != idx) & (comp[wy, wx] > 0)
            window = np.where(others, 0.0, coverage_HWK[wy, wx, k])
            local = (bbox[0] - wx.start, bbox[1] - wy.start, bbox[2] - wx.start, bbox[3] - wy.start)
            shape, iou = classify_shape(window, local, sigmas)
            if iou < config.min_match:
                continue
            detections.append(Detection(shape, name, bbox, area, iou))
    return sorted(detections, key=lambda d: -d.score)
