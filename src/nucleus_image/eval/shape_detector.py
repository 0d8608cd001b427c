"""A detector for the synthetic shapes domain (`nucleus_image.data.synthetic`), built the way GenEval separates
detection from colour: the compositional scorer's stand-in for GenEval's Mask2Former + CLIP colour classifier.

1. Background: the median of a 2-pixel border frame (scenes keep objects off the border), and its noise level
   (the border's robust spread of distances from that median).
2. Segmentation, blind to hue and saturation: a pixel is foreground when its RGB distance from the background
   clears `min_contrast` (and several times the noise). Specks are dropped, a small closing joins fragments of
   one object, then connected components. Faded, grey, off-palette, noisy or blurred objects are all found.
3. Per component, a coverage map: the pixel's distance from the background over the component's own full
   contrast (a high percentile inside it), clipped to [0, 1]. Its 0.5 contour is the true outline of a blurred
   shape whatever the object's contrast; components too small or too thin (halos, lines) are dropped.
4. Shape on that colour-free coverage: soft IoU with each shape's template, drawn by the generator's own code
   into the component's box (slightly larger boxes, a few blurs, since blur shortens points); the best shape
   counts if it clears `min_match`, and that IoU is the detection's confidence.
5. Colour afterwards, as a forced choice over the palette (GenEval's CLIP step picks the likeliest of its colour
   names for the crop): the mean of the component's core pixels is explained as background + a (colour -
   background); the palette colour whose line passes nearest wins. So a faded red (pink-looking) object is red,
   not orange, and only a wrong hue changes the answer.
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

    min_contrast: float = 45.0  # RGB distance from the background a foreground pixel needs (textures reach ~25)
    noise_factor: float = 4.0  # ... and this many robust standard deviations of the border's own noise
    full_contrast_quantile: float = 0.8  # a component's full contrast: this quantile of its distances
    core_coverage: float = 0.75  # pixels at least this covered give the object's colour (edges mix background)
    # Components smaller than the domain's smallest object are not objects: at 32 px an untrained model paints
    # token-sized (4 px) blobs that would otherwise pass as small squares and circles.
    min_area: float = 0.012  # component area / short side^2 (the smallest generated star is ~0.02)
    min_side: float = 0.17  # shorter box side / short side (the smallest generated box is 0.24)
    speck_area: float = 0.001  # raw fragments below this are noise and never merged
    min_thickness: float = 0.018  # inradius / short side: blur halos and thin lines are thinner
    merge_radius: float = 0.015  # closing radius / short side joining fragments of one object
    min_match: float = 0.6  # soft template IoU needed to call a component a shape
    max_aspect: float = 2.0  # generated shapes have square boxes; far longer components are not shapes
    max_side: int = 256  # larger images are downscaled to this short side first: same answer, far less work
    blur_sigmas: tuple[float, ...] = (0.0, 0.008, 0.016, 0.03)  # template blurs tried, / short side


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels (x1, y1 exclusive)
    area: int
    score: float  # IoU with the shape's template

    def to_dict(self) -> dict:
        return {
            "shape": self.shape,
            "color": self.color,
            "bbox": [round(v, 1) for v in self.bbox],
            "area": self.area,
            "score": round(self.score, 3),
        }


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


def _border(rgb_HWC: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [
            rgb_HWC[:2].reshape(-1, 3),
            rgb_HWC[-2:].reshape(-1, 3),
            rgb_HWC[:, :2].reshape(-1, 3),
            rgb_HWC[:, -2:].reshape(-1, 3),
        ]
    )


def estimate_background(rgb_HWC: np.ndarray) -> tuple[np.ndarray, float]:
    """The background colour (median of the border frame) and the border's noise: 1.4826 x the median absolute
    deviation of its distances from that colour (a standard deviation, robust to an object touching the frame)."""
    border = _border(rgb_HWC)
    background = np.median(border, axis=0)
    dist = np.linalg.norm(border - background, axis=-1)
    return background, float(1.4826 * np.median(np.abs(dist - np.median(dist))))


def classify_color(mean_rgb: np.ndarray, background: np.ndarray) -> str:
    """Forced choice over the palette: the colour c whose mixing line background + a (c - background), a in
    [0.2, 1.2], passes nearest to the object's mean colour. Fading (a < 1) therefore never changes the answer,
    and an off-palette colour gets its nearest palette hue."""
    v = mean_rgb - background
    d_KC = _PALETTE_KC - background
    a_K = np.clip((d_KC @ v) / np.maximum((d_KC * d_KC).sum(-1), 1.0), 0.2, 1.2)
    resid_K = np.linalg.norm(v[None] - a_K[:, None] * d_KC, axis=-1)
    return _COLOR_NAMES[int(resid_K.argmin())]


@lru_cache(maxsize=8192)
def _template(shape: str, window: tuple[int, int], box: tuple[float, float, float, float], sigma: float) -> np.ndarray:
    """Anti-aliased coverage (0..1) of `shape` filling `box` inside a window (h, w), blurred by sigma pixels."""
    ss = 4
    h, w = window
    canvas = Image.new("L", (w * ss, h * ss))
    draw_shape(ImageDraw.Draw(canvas), shape, tuple(v * ss for v in box), 255)
    cov = np.asarray(canvas.reduce(ss), dtype=np.float32) / 255.0
    return ndimage.gaussian_filter(cov, sigma) if sigma > 0 else cov


def classify_shape(
    coverage_HW: np.ndarray, box: tuple[float, float, float, float], sigmas: tuple[float, ...]
) -> tuple[str, float]:
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
        return [
            Detection(d.shape, d.color, tuple(v * scale for v in d.bbox), round(d.area * scale * scale), d.score)
            for d in _detect(rgb, config)
        ]
    return _detect(rgb, config)


def _detect(rgb: np.ndarray, config: DetectorConfig) -> list[Detection]:
    short = min(rgb.shape[:2])
    background, noise = estimate_background(rgb)
    dist_HW = np.linalg.norm(rgb - background, axis=-1)
    mask = dist_HW >= max(config.min_contrast, config.noise_factor * noise)
    sigmas = tuple(round(f * short, 2) for f in config.blur_sigmas)
    eight = np.ones((3, 3), dtype=bool)
    comp, n = ndimage.label(mask, structure=eight)
    if n == 0:
        return []
    sizes = ndimage.sum_labels(mask, comp, index=np.arange(1, n + 1))
    mask = np.isin(comp, np.flatnonzero(sizes >= config.speck_area * short * short) + 1)
    radius = int(round(config.merge_radius * short))
    if radius:  # below ~35 px a closing would join neighbours sooner than fragments
        disk = np.hypot(*np.mgrid[-radius : radius + 1, -radius : radius + 1]) <= radius + 0.5
        # Pad before closing so objects at the border are not eroded by the implicit outside.
        mask = ndimage.binary_closing(np.pad(mask, radius), structure=disk)[radius:-radius, radius:-radius] | mask
    comp, n = ndimage.label(mask, structure=eight)
    detections = []
    for idx, sl in enumerate(ndimage.find_objects(comp), start=1):
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        pad = max(2, int(0.3 * max(h, w)))
        wy = slice(max(0, sl[0].start - pad), sl[0].stop + pad)
        wx = slice(max(0, sl[1].start - pad), sl[1].stop + pad)
        own = comp[wy, wx] == idx
        full = float(np.quantile(dist_HW[wy, wx][own], config.full_contrast_quantile))
        # Colour-free coverage of this component alone (other components' pixels and far pixels are zeroed).
        near = ndimage.binary_dilation(own, iterations=max(1, radius))
        coverage = np.where(near & ~((comp[wy, wx] > 0) & ~own), np.clip(dist_HW[wy, wx] / full, 0.0, 1.0), 0.0)
        region = own & (coverage >= 0.5)
        area = int(region.sum())
        if area < config.min_area * short * short:
            continue
        ys, xs = np.nonzero(region)
        rh, rw = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        if max(rh, rw) > config.max_aspect * min(rh, rw) or min(rh, rw) < config.min_side * short:
            continue
        if ndimage.distance_transform_edt(np.pad(region, 1)).max() < max(1.0, config.min_thickness * short):
            continue
        local = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
        shape, iou = classify_shape(coverage.astype(np.float32), local, sigmas)
        if iou < config.min_match:
            continue
        core = own & (coverage >= config.core_coverage)
        color = classify_color(rgb[wy, wx][core if core.any() else region].mean(0), background)
        bbox = (local[0] + wx.start, local[1] + wy.start, local[2] + wx.start, local[3] + wy.start)
        detections.append(Detection(shape, color, bbox, area, iou))
    return sorted(detections, key=lambda d: -d.score)
