"""Decode and validate one image: format, truncation, size and aspect bounds, decompression bombs, EXIF
orientation and pixel-mode normalisation. Every refusal raises `Rejected` with a reason code from
`nucleus_image.data.manifest.REJECT_REASONS`; nothing here writes anything.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from nucleus_image.data.curate.config import ValidateConfig
from nucleus_image.data.manifest import REJECT_REASONS


class Rejected(Exception):
    """An input refused by a stage, with a reason code and the offending value."""

    def __init__(self, stage: str, reason: str, detail: str = ""):
        assert reason in REJECT_REASONS, reason  # a programming error, not bad input: every code is documented
        super().__init__(f"{stage}/{reason}: {detail}")
        self.stage, self.reason, self.detail = stage, reason, detail


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB 8-bit whatever the source mode: CMYK via Pillow's conversion, palette through RGBA so transparency is
    honoured, 16/32-bit integer and float greys rescaled from their actual range, alpha composited onto white
    (the convention of the web images such corpora come from)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).round().astype(np.uint8), "L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _check_size(w: int, h: int, cfg: ValidateConfig) -> None:
    short, long = min(w, h), max(w, h)
    if short < cfg.min_side:
        raise Rejected("validate", "too_small", f"size {w}x{h}: shorter side {short} < {cfg.min_side}")
    if long > cfg.max_side:
        raise Rejected("validate", "too_large", f"size {w}x{h}: longer side {long} > {cfg.max_side}")
    if long / short > cfg.max_aspect:
        raise Rejected("validate", "aspect_ratio", f"size {w}x{h}: aspect {long / short:.2f} > {cfg.max_aspect}")


def decode(data: bytes, cfg: ValidateConfig) -> tuple[Image.Image, dict]:
    """(RGB image after EXIF orientation, info) or raise Rejected. info: format, source mode, width, height."""
    if not data:
        raise Rejected("validate", "zero_byte", "0 bytes")
    Image.MAX_IMAGE_PIXELS = cfg.max_pixels  # Pillow's own guard, a backstop behind the header check below
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size  # the header only: nothing decoded yet
            if w * h > cfg.max_pixels:
                raise Rejected("validate", "decompression_bomb", f"header size {w}x{h} = {w * h} px > {cfg.max_pixels}")
            _check_size(w, h, cfg)  # bounds and aspect do not depend on EXIF rotation: refuse before decoding
            fmt, mode = img.format or "unknown", img.mode
            img.load()
            img = ImageOps.exif_transpose(img)
    except Rejected:
        raise
    except UnidentifiedImageError:
        raise Rejected("validate", "not_an_image", f"{len(data)} bytes, no known image signature") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise Rejected("validate", "decompression_bomb", str(err)) from None
    except Exception as err:  # Pillow's plugins raise many types on corrupt data; all mean the same here
        raise Rejected("validate", "truncated", f"{type(err).__name__}: {err}") from None
    try:
        rgb = _to_rgb(img)
    except (OSError, ValueError) as err:
        raise Rejected("validate", "unsupported_mode", f"mode {mode}: {err}") from None
    return rgb, {"format": fmt, "mode": mode, "width": rgb.width, "height": rgb.height}
