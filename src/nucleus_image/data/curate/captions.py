"""Captions: cleaning, alignment scoring, keep / refine / synthesize routing, granularity variants and ordering.

Routing (REFERENCE.md section 3) by an alignment score in [0, 1]: above `keep_above` a caption is kept as is;
between the thresholds it is kept and marked `refine` for a captioner pass; below `synthesize_below` it is too
poorly aligned to train on, so it is dropped and the image marked as needing a synthesized caption. Every
decision is recorded in the manifest row's annotations (`curation.captions`). An image left with no caption
is rejected as `no_caption`, so a user can caption those images and feed them back.

The built-in `CaptionTextHeuristicScorer` reads ONLY the caption text -- length, letter share, word variety,
file-name / URL / boilerplate patterns, mojibake -- and never the image, so it measures how descriptive a
caption is, not whether it matches the picture. Plug an image-text model for real alignment:

    class MyAlignment:                      # any "package.module:Factory" returning an object like this
        name = "my-alignment-model"
        def score(self, images, captions):  # RGB PIL images (longer side analysis_side), one list of str each
            return [[...], ...]             # per image, one float in [0, 1] per caption

The built-in learned scorer is CLIP / SigLIP similarity (`captions.model`, see `clip_scoring`).

Granularities: 1 sentence, 2 sentences, 3-5 sentences, paragraph (6+). Where an image's captions are all
3 sentences or longer, the shorter granularities are derived from the best one by keeping its leading
sentences (source "derived:<granularity>:from:<source>"). captions[] is ordered from lowest to highest
quality: by alignment score, then granularity (a shorter variant of a caption counts as lower), then text.
"""

from __future__ import annotations

import re
from typing import Protocol

from PIL import Image

from nucleus_image.data.curate.config import CaptionConfig
from nucleus_image.data.curate.plugins import load_plugin

GRANULARITIES = ("1-sentence", "2-sentence", "3-5-sentence", "paragraph")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")
_WORD = re.compile(r"[^\W\d_]+")
_FILENAME = re.compile(r"^\S+\.(jpe?g|png|gif|webp|tiff?|bmp)$|^(img|dsc|dcim|photo|image)[\s_-]*\d+", re.I)
_URL = re.compile(r"https?://|www\.", re.I)
_BOILERPLATE = {"image", "photo", "picture", "untitled", "stock", "jpg", "png", "img", "file", "download", "thumbnail"}
_MOJIBAKE = ("Ã", "â€", "Â", "\ufffd")


def clean(text: str) -> str:
    return " ".join(text.split())


def sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def granularity(text: str) -> str:
    n = len(sentences(text))
    return (
        GRANULARITIES[0] if n <= 1 else GRANULARITIES[1] if n == 2 else GRANULARITIES[2] if n <= 5 else GRANULARITIES[3]
    )


class AlignmentScorer(Protocol):
    name: str

    def score(self, images: list[Image.Image], captions: list[list[str]]) -> list[list[float]]: ...


class CaptionTextHeuristicScorer:
    """Text-only heuristic (see the module docstring): 0.1 + 0.9 * length * letter share * sqrt(word variety),
    with file names, URLs, boilerplate-only and mojibake captions pushed below the synthesize threshold."""

    name = "caption-text-heuristic"

    def score_text(self, text: str) -> float:
        words = _WORD.findall(text)
        if not words:
            return 0.0
        if _FILENAME.search(text) or _URL.search(text):
            return 0.1
        lowered = [w.lower() for w in words]
        if set(lowered) <= _BOILERPLATE:
            return 0.1
        visible = [c for c in text if not c.isspace()]
        letters = sum(c.isalpha() for c in visible) / len(visible)
        variety = len(set(lowered)) / len(lowered)
        length = min(1.0, len(words) / 8.0)
        value = 0.1 + 0.9 * length * letters * variety**0.5
        return value * 0.5 if any(m in text for m in _MOJIBAKE) else value

    def score(self, images: list[Image.Image], captions: list[list[str]]) -> list[list[float]]:
        return [[self.score_text(c) for c in caps] for caps in captions]


BUILTIN_SCORERS = {CaptionTextHeuristicScorer.name: CaptionTextHeuristicScorer}


def load_scorer(spec: str) -> AlignmentScorer:
    return load_plugin(spec, BUILTIN_SCORERS, "caption alignment scorer")


def route(score: float, cfg: CaptionConfig) -> str:
    if score > cfg.keep_above:
        return "keep"
    return "synthesize" if score < cfg.synthesize_below else "refine"


def curate_captions(
    texts: list[str], sources: list[str], scores: list[float], cfg: CaptionConfig
) -> tuple[list[str], list[str], list[dict]]:
    """(captions low->high quality, their sources, one decision record per input caption and derived variant)."""
    records, kept = [], []
    for text, source, score in zip(texts, sources, scores):
        decision = route(score, cfg)
        records.append(
            {"source": source, "score": round(score, 4), "route": decision, "granularity": granularity(text)}
        )
        if decision != "synthesize":
            kept.append((score, GRANULARITIES.index(granularity(text)), text, source))
    if cfg.derive_granularities and kept and min(g for _, g, _, _ in kept) >= 2:
        score, g, text, source = max(kept)
        parts = sentences(text)
        for target, n in ((0, 1), (1, 2), (2, 5)):
            if target < g:
                variant = " ".join(parts[:n])
                kept.append((score, target, variant, f"derived:{GRANULARITIES[target]}:from:{source}"))
                records.append(
                    {
                        "source": kept[-1][3],
                        "score": round(score, 4),
                        "route": route(score, cfg),
                        "granularity": GRANULARITIES[target],
                    }
                )
    kept.sort(key=lambda k: (k[0], k[1], k[2]))
    return [k[2] for k in kept], [k[3] for k in kept], records
