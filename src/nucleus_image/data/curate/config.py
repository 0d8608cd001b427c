"""Typed configuration of a curation run, with named presets, loadable from a JSON or TOML file.

    cfg = CurateConfig.preset("recipe")                  # the thresholds of REFERENCE.md section 3
    cfg = CurateConfig.from_file("curate.toml")           # any subset of fields; unknown keys are refused

A file mirrors the dataclasses: top-level run fields plus [validate], [dedup], [quality], [captions],
[captioner] and [buckets] tables, and an optional `preset = "..."` that the other keys override.

Learned models are folders written by `save_pretrained` (see `model_folders`): `quality.model` (CLIP or SigLIP
with an aesthetic head), `captions.model` (CLIP or SigLIP) and `captioner.model` (a vision-language model).
Left unset, the heuristic scorers run and no captions are written.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

MODEL_DTYPES = ("float32", "bfloat16", "float16")
CAPTIONER_WHEN = ("needed", "always")


@dataclass(frozen=True)
class ValidateConfig:
    min_side: int = 256  # shorter side, px
    max_side: int = 8096  # longer side, px
    max_aspect: float = 4.0  # long side / short side
    # Decompression-bomb guard: the header's pixel count is checked before any pixel is decoded.
    max_pixels: int = 8096 * 8096


@dataclass(frozen=True)
class DedupConfig:
    hamming_below: int = 5  # near-duplicates: pHash Hamming distance < this


@dataclass(frozen=True)
class QualityConfig:
    # A dotted path "package.module:Factory" of a QualityScorer, or the built-in heuristic's name.
    scorer: str = "image-statistics-heuristic"
    # A CLIP / SigLIP folder with aesthetic_head.safetensors; its aesthetic score (0..10) replaces `scorer`.
    model: str | None = None
    min_score: float = 5.0  # images scoring below are rejected as low_quality
    tier_edges: tuple[float, ...] = (5.5, 6.0, 6.5, 6.8)  # A1 [min,5.5) A2 [5.5,6) A3 [6,6.5) A4 [6.5,6.8) A5 >=6.8
    blank_std: float = 3.0  # luminance std (0..255) below which an image is flat
    clip_fraction: float = 0.9  # share of pixels at <=2 or >=253 that makes an exposure anomaly
    min_grey_levels: int = 8  # fewer distinct luminance levels is a posterisation anomaly
    blur_laplacian_min: float = 30.0  # Laplacian variance on the 256-px analysis image
    blur_highfreq_min: float = 0.02  # share of spectral energy above a quarter of Nyquist
    analysis_side: int = 256  # statistics are measured on a copy resized to this longer side


@dataclass(frozen=True)
class CaptionConfig:
    # A dotted path "package.module:Factory" of an AlignmentScorer, or the built-in heuristic's name.
    scorer: str = "caption-text-heuristic"
    # A CLIP / SigLIP folder; image-text cosine similarity, mapped onto [0, 1] by similarity_range, replaces `scorer`.
    model: str | None = None
    similarity_range: tuple[float, float] = (0.15, 0.35)  # cosine at alignment 0 and 1 (linear, clipped)
    keep_above: float = 0.65  # alignment > keep_above: keep as is
    synthesize_below: float = 0.30  # alignment < synthesize_below: drop, a captioner must write a new one
    derive_granularities: bool = True  # derive 1 / 2 / 3-5 sentence variants from a longer caption


@dataclass(frozen=True)
class CaptionerConfig:
    model: str | None = None  # a vision-language model folder (AutoModelForImageTextToText + its processor)
    when: str = "needed"  # "needed": images with no caption scoring >= captions.synthesize_below; "always"
    # One instruction per granularity (short, medium, detailed), answered greedily (deterministic).
    prompts: tuple[str, str, str] = (
        "Describe this image in one sentence.",
        "Describe this image in two sentences.",
        "Describe this image in detail, in three to five sentences.",
    )
    max_new_tokens: tuple[int, int, int] = (40, 80, 200)
    image_side: int = 448  # the captioner sees a copy with this longer side (never upscaled)


@dataclass(frozen=True)
class BucketConfig:
    quality_weight: float = 0.6  # z = w*q + (1-w)*s
    mu_range: float = 1.75  # bucket centres mu = linspace(-mu_range, mu_range, 8)
    sigma: float = 1.0
    temperature: float = 0.7
    soft_cap: float = 0.35  # no bucket holds more than this share; overflow moves to its next-likeliest bucket
    size_edges: tuple[int, ...] = (384, 512, 768, 1024, 1536)  # sqrt(w*h) edges of the size ranks
    seed: int = 0


@dataclass(frozen=True)
class CurateConfig:
    chunk_size: int = 64  # images per work unit; a unit is the resumable grain
    num_shards: int = 8  # manifest shards, by partition_key range
    workers: int = 0  # local engine processes; 0 = all cores
    ray_address: str | None = None  # None: start Ray locally (or reuse a running session)
    ray_model_actors: int = 0  # Ray actors holding the models, one GPU each where there are GPUs; 0 = one per GPU, or 1
    model_batch_size: int = 16  # images per forward pass of a learned model
    model_dtype: str = "float32"  # float32, bfloat16 or float16 (on GPU; CPU always runs float32)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    buckets: BucketConfig = field(default_factory=BucketConfig)

    def __post_init__(self):
        checks = [
            (self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}"),
            (self.num_shards >= 1, f"num_shards must be >= 1, got {self.num_shards}"),
            (self.workers >= 0, f"workers must be >= 0 (0 = all cores), got {self.workers}"),
            (
                0 < self.validate.min_side <= self.validate.max_side,
                f"need 0 < validate.min_side <= validate.max_side, got {self.validate.min_side}, {self.validate.max_side}",
            ),
            (self.validate.max_aspect >= 1.0, f"validate.max_aspect must be >= 1, got {self.validate.max_aspect}"),
            (
                1 <= self.dedup.hamming_below <= 32,
                f"dedup.hamming_below must be in [1, 32], got {self.dedup.hamming_below}",
            ),
            (
                list(self.quality.tier_edges) == sorted(self.quality.tier_edges) and len(self.quality.tier_edges) == 4,
                f"quality.tier_edges must be 4 ascending scores (A2..A5 lower edges), got {self.quality.tier_edges}",
            ),
            (
                0.0 <= self.captions.synthesize_below <= self.captions.keep_above <= 1.0,
                f"need 0 <= captions.synthesize_below <= captions.keep_above <= 1, got "
                f"{self.captions.synthesize_below}, {self.captions.keep_above}",
            ),
            (
                self.buckets.temperature > 0 and self.buckets.sigma > 0,
                f"buckets.temperature and buckets.sigma must be > 0, got {self.buckets.temperature}, {self.buckets.sigma}",
            ),
            (
                1 / 8 <= self.buckets.soft_cap <= 1.0,
                f"buckets.soft_cap must be in [1/8, 1], got {self.buckets.soft_cap}",
            ),
            (
                self.model_batch_size >= 1 and self.ray_model_actors >= 0,
                f"need model_batch_size >= 1 and ray_model_actors >= 0, got {self.model_batch_size}, "
                f"{self.ray_model_actors}",
            ),
            (
                self.model_dtype in MODEL_DTYPES,
                f"model_dtype must be one of {list(MODEL_DTYPES)}, got {self.model_dtype!r}",
            ),
            (
                self.quality.model is None or self.quality.scorer == QualityConfig.scorer,
                f"give quality.scorer or quality.model, not both (got {self.quality.scorer!r} and "
                f"{self.quality.model!r})",
            ),
            (
                self.captions.model is None or self.captions.scorer == CaptionConfig.scorer,
                f"give captions.scorer or captions.model, not both (got {self.captions.scorer!r} and "
                f"{self.captions.model!r})",
            ),
            (
                len(self.captions.similarity_range) == 2
                and self.captions.similarity_range[0] < self.captions.similarity_range[1],
                f"captions.similarity_range must be (low, high) with low < high, got {self.captions.similarity_range}",
            ),
            (
                self.captioner.when in CAPTIONER_WHEN,
                f"captioner.when must be one of {list(CAPTIONER_WHEN)}, got {self.captioner.when!r}",
            ),
            (
                len(self.captioner.prompts) == 3
                and len(self.captioner.max_new_tokens) == 3
                and min(self.captioner.max_new_tokens) >= 1,
                f"captioner.prompts and captioner.max_new_tokens need 3 entries each (short, medium, detailed; "
                f"tokens >= 1), got {len(self.captioner.prompts)} and {self.captioner.max_new_tokens}",
            ),
            (self.captioner.image_side >= 32, f"captioner.image_side must be >= 32, got {self.captioner.image_side}"),
        ]
        problems = [msg for ok, msg in checks if not ok]
        if problems:
            raise ValueError("invalid curation config: " + "; ".join(problems))

    @classmethod
    def preset(cls, name: str) -> CurateConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown curation preset {name!r}; accepted: {sorted(PRESETS)}")
        return PRESETS[name]

    @classmethod
    def from_dict(cls, data: dict) -> CurateConfig:
        data = dict(data)
        base = cls.preset(data.pop("preset", "recipe"))
        return _merge(base, data, "")

    @classmethod
    def from_file(cls, path: str | Path) -> CurateConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        if path.suffix == ".toml":
            data = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise ValueError(f"config file {str(path)!r}: expected a .toml or .json file")
        return cls.from_dict(data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_folders(self) -> dict[str, str]:
        """The learned-model folders this config names, by config key (quality.model, ...)."""
        named = {
            "quality.model": self.quality.model,
            "captions.model": self.captions.model,
            "captioner.model": self.captioner.model,
        }
        return {key: folder for key, folder in named.items() if folder is not None}


def _merge(base, overrides: dict, prefix: str):
    """A copy of dataclass `base` with `overrides` applied recursively; unknown keys raise ValueError."""
    fields = {f.name: f for f in dataclasses.fields(base)}
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown curation config key {prefix + key!r}; accepted: {sorted(fields)}")
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"curation config key {prefix + key!r} must be a table, got {value!r}")
            changes[key] = _merge(current, value, f"{prefix}{key}.")
        else:
            changes[key] = tuple(value) if isinstance(current, tuple) else value
    return dataclasses.replace(base, **changes)


PRESETS: dict[str, CurateConfig] = {
    # REFERENCE.md section 3: the published thresholds.
    "recipe": CurateConfig(),
    # Keeps every valid, unique, non-degenerate image whatever its score: for small or synthetic corpora where
    # the image-statistics heuristic's absolute scale means little; tiers still spread by score.
    "lenient": CurateConfig(quality=QualityConfig(min_score=0.0)),
}
