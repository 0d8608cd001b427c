"""The body of `POST /v1/images/generations`, checked field by field: every refusal names the field, the value it
got and what is accepted, before anything is queued.

    parse_request(b'{"prompt": "a red cube", "n": 2, "aspect_ratio": "16:9", "seed": 7}', limits, geometry)
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import asdict, dataclass
from numbers import Real

from nucleus_image.pipeline.presets import ASPECT_RATIOS, preset_size

RESPONSE_FORMATS = ("b64_json", "url")
# Seeds travel through the web page as JavaScript numbers, which are exact up to 2**53.
MAX_SEED = 2**53 - 1
SIZE_PATTERN = re.compile(r"^(\d{1,5})x(\d{1,5})$")


class RequestError(ValueError):
    """A refused request: `param` is the offending field (None for the body as a whole)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 1000
    max_images: int = 4  # n per request
    max_steps: int = 100
    max_guidance: float = 20.0
    max_side: int | None = None  # pixels; None: twice the model's native size
    max_body_bytes: int = 64 * 1024


@dataclass(frozen=True)
class Defaults:
    steps: int = 50
    guidance_scale: float = 4.0
    response_format: str = "b64_json"


@dataclass(frozen=True)
class Geometry:
    """What sizes the model takes: its native square side and the pixel multiple every side must be."""

    sample_size: int
    granularity: int

    def aspect_sizes(self) -> dict[str, tuple[int, int]]:
        return {a: preset_size(a, self.sample_size, self.granularity) for a in ASPECT_RATIOS}


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    negative_prompt: str | None
    n: int
    width: int
    height: int
    aspect_ratio: str | None
    steps: int
    guidance_scale: float
    seed: int  # image k of the request uses seed + k, as `nucleus generate` does
    response_format: str

    @property
    def batch_key(self) -> tuple:
        """Images with equal keys can share one pipeline call: the pipeline takes one size, one step count and
        one guidance scale per call, while prompts, negative prompts and seeds may differ per row."""
        return (self.width, self.height, self.steps, self.guidance_scale)

    def settings(self) -> dict:
        return asdict(self)


FIELDS = (
    "prompt",
    "negative_prompt",
    "n",
    "size",
    "aspect_ratio",
    "steps",
    "guidance_scale",
    "seed",
    "response_format",
    "model",
)


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(body: dict, name: str, default, low: int, high: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"'{name}' must be an integer in [{low}, {high}], got {_show(value)}")
    if not low <= value <= high:
        raise RequestError(name, f"'{name}' must be in [{low}, {high}], got {value}")
    return value


def _text(body: dict, name: str, limit: int, required: bool) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise RequestError(name, f"'{name}' is required: describe the image to generate")
        return None
    if not isinstance(value, str):
        raise RequestError(name, f"'{name}' must be a string, got {_show(value)}")
    if required and not value.strip():
        raise RequestError(name, f"'{name}' is empty; describe the image to generate")
    if len(value) > limit:
        raise RequestError(name, f"'{name}' has {len(value)} characters; at most {limit} are accepted")
    return value


def _size(body: dict, geometry: Geometry, max_side: int) -> tuple[int, int, str | None]:
    size, aspect = body.get("size"), body.get("aspect_ratio")
    if size is not None and aspect is not None:
        raise RequestError("size", f"pass 'size' ({_show(size)}) or 'aspect_ratio' ({_show(aspect)}), not both")
    if aspect is not None:
        if aspect not in ASPECT_RATIOS:
            raise RequestError(
                "aspect_ratio", f"'aspect_ratio' {_show(aspect)} is not one of {', '.join(ASPECT_RATIOS)}"
            )
        width, height = preset_size(aspect, geometry.sample_size, geometry.granularity)
        return width, height, aspect
    if size is None:
        return geometry.sample_size, geometry.sample_size, None
    g = geometry.granularity
    match = SIZE_PATTERN.match(size) if isinstance(size, str) else None
    if match is None:
        raise RequestError(
            "size",
            f"'size' must be a string WIDTHxHEIGHT such as "
            f'"{geometry.sample_size}x{geometry.sample_size}", got {_show(size)}',
        )
    width, height = int(match[1]), int(match[2])
    for side in (width, height):
        if side % g or not g <= side <= max_side:
            raise RequestError(
                "size",
                f"'size' {size} is not accepted: each side must be a multiple of {g} px "
                f"(this model's autoencoder factor x patch size) between {g} and {max_side}",
            )
    return width, height, None


def parse_request(
    raw: bytes, limits: Limits, defaults: Defaults, geometry: Geometry, model_id: str
) -> GenerationRequest:
    if len(raw) > limits.max_body_bytes:
        raise RequestError(None, f"request body has {len(raw)} bytes; at most {limits.max_body_bytes} are accepted")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise RequestError(None, f"request body is not valid JSON: {getattr(err, 'msg', err)}{where}") from None
    if not isinstance(body, dict):
        raise RequestError(None, f"request body must be a JSON object, got {type(body).__name__}: {_show(body)}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(
            unknown[0], f"unknown field {', '.join(repr(k) for k in unknown)}; accepted: {', '.join(FIELDS)}"
        )
    if body.get("model") not in (None, model_id):
        raise RequestError(
            "model", f"'model' {_show(body['model'])} is not served here; this server has {_show(model_id)}"
        )

    prompt = _text(body, "prompt", limits.max_prompt_chars, required=True)
    negative = _text(body, "negative_prompt", limits.max_prompt_chars, required=False)
    n = _int(body, "n", 1, 1, limits.max_images)
    width, height, aspect = _size(body, geometry, limits.max_side or 2 * geometry.sample_size)
    steps = _int(body, "steps", defaults.steps, 1, limits.max_steps)

    guidance = body.get("guidance_scale", defaults.guidance_scale)
    if guidance is None:
        guidance = defaults.guidance_scale
    if (
        isinstance(guidance, bool)
        or not isinstance(guidance, Real)
        or not math.isfinite(guidance)
        or not 0 <= guidance <= limits.max_guidance
    ):
        raise RequestError(
            "guidance_scale",
            f"'guidance_scale' must be a number in [0, {limits.max_guidance}] "
            f"(<= 1 turns guidance off), got {_show(guidance)}",
        )

    seed = _int(body, "seed", None, 0, MAX_SEED - (n - 1))
    if seed is None:
        seed = secrets.randbelow(2**31)

    response_format = body.get("response_format") or defaults.response_format
    if response_format not in RESPONSE_FORMATS:
        raise RequestError(
            "response_format",
            f"'response_format' must be one of {', '.join(RESPONSE_FORMATS)}, got {_show(response_format)}",
        )
    return GenerationRequest(
        prompt=prompt,
        negative_prompt=negative,
        n=n,
        width=width,
        height=height,
        aspect_ratio=aspect,
        steps=steps,
        guidance_scale=float(guidance),
        seed=seed,
        response_format=response_format,
    )
