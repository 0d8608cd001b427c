"""CLIP / SigLIP image embeddings as curation stages: an aesthetic score for the quality tiers, and image-text
similarity for the caption checks. Both run transformers' own classes (CLIPModel / SiglipModel and the folder's
processor) loaded from safetensors, in batches of `model_batch_size` images.

    cfg = CurateConfig.from_dict({"quality": {"model": "models/clip-l14"}, "captions": {"model": "models/clip-l14"}})

Aesthetic score: the L2-normalised image embedding through the head in aesthetic_head.safetensors (a linear
layer, or the LAION improved aesthetic predictor's stack of linear layers; see `model_folders.head_layers`).
LAION's heads were fitted to 1..10 human ratings, the scale of the recipe's thresholds, so the score is used as
is: min_score rejects, tier_edges split A1..A5.

Alignment: cosine similarity of the normalised image and caption embeddings, mapped linearly from
captions.similarity_range = (low, high) onto [0, 1] and clipped, so the keep / refine / synthesize thresholds
apply to it as to any scorer. With the default (0.15, 0.35), a caption is synthesized (dropped) below cosine
0.21, refined up to 0.28 and kept above: the spread of matching vs random pairs for CLIP ViT-B/L. SigLIP's
cosines sit lower; give it its own range. When quality.model and captions.model name the same folder, the
model is loaded once.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from nucleus_image.data.curate.model_folders import (
    AESTHETIC_HEAD,
    device_and_dtype,
    embed_dim,
    folder_info,
    head_layers,
)


def _normalised(features) -> torch.Tensor:
    """L2-normalised float32 CPU embeddings from get_image/text_features: a tensor before transformers 5, an
    output whose pooler_output is the projected embedding from 5 on."""
    x = features if isinstance(features, torch.Tensor) else features.pooler_output
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu()


class ClipEmbedder:
    """A CLIP or SigLIP model and its processor; embeddings come back L2-normalised, float32, on the CPU."""

    def __init__(self, folder: str, dtype_name: str):
        from transformers import AutoProcessor, CLIPModel, SiglipModel

        self.config = json.loads((Path(folder) / "config.json").read_text())
        model_cls = {"clip": CLIPModel, "siglip": SiglipModel}[self.config["model_type"]]
        self.device, dtype = device_and_dtype(dtype_name)
        self.model = (
            model_cls.from_pretrained(folder, use_safetensors=True, dtype=dtype, local_files_only=True)
            .to(self.device)
            .eval()
        )
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.dtype = dtype
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.padding = "max_length" if self.config["model_type"] == "siglip" else True  # SigLIP trained padded
        self._last: tuple[list, torch.Tensor] | None = None

    @torch.inference_mode()
    def images(self, images: list[Image.Image], batch_size: int) -> torch.Tensor:
        """Embeddings of `images`; asked again for the very same image objects (the aesthetic and the alignment
        scorer of one work unit sharing a model), the embeddings computed the first time."""
        last = self._last
        if last is not None and len(last[0]) == len(images) and all(a is b for a, b in zip(last[0], images)):
            return last[1]
        out = []
        for start in range(0, len(images), batch_size):
            pixels = self.processor.image_processor(images=images[start : start + batch_size], return_tensors="pt")
            feats = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device, self.dtype))
            out.append(_normalised(feats))
        embeds = torch.cat(out) if out else torch.zeros(0, embed_dim(self.config))
        self._last = (list(images), embeds)
        return embeds

    @torch.inference_mode()
    def texts(self, texts: list[str], batch_size: int) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.processor.tokenizer(
                texts[start : start + batch_size],
                padding=self.padding,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            out.append(_normalised(self.model.get_text_features(**tokens)))
        return torch.cat(out) if out else torch.zeros(0, embed_dim(self.config))


def load_embedder(folder: str, dtype_name: str) -> ClipEmbedder:
    """One embedder per folder, dtype and folder content: shared by the two scorers, reloaded after a change."""
    return _embedder(folder, dtype_name, folder_info(folder).sha256)


@lru_cache(maxsize=2)
def _embedder(folder: str, dtype_name: str, sha256: str) -> ClipEmbedder:
    return ClipEmbedder(folder, dtype_name)


class ClipAestheticScorer:
    """A QualityScorer: aesthetic head over the image embedding (see the module docstring)."""

    def __init__(self, folder: str, name: str, batch_size: int, dtype_name: str):
        from safetensors.torch import load_file

        self.name, self.batch_size = name, batch_size
        self.embedder = load_embedder(folder, dtype_name)
        layers = head_layers(load_file(str(Path(folder) / AESTHETIC_HEAD)), embed_dim(self.embedder.config))
        self.layers = [(w.float(), b.float()) for w, b in layers]

    def score(self, images: list[Image.Image], stats: list[dict[str, float]]) -> list[float]:
        x_ND = self.embedder.images(images, self.batch_size)
        for w_OI, b_O in self.layers:
            x_ND = x_ND @ w_OI.T + b_O
        return x_ND[:, 0].double().tolist()


class ClipAlignmentScorer:
    """An AlignmentScorer: image-caption cosine similarity mapped onto [0, 1] (see the module docstring)."""

    def __init__(self, folder: str, name: str, batch_size: int, dtype_name: str, similarity_range: tuple):
        self.name, self.batch_size = name, batch_size
        self.low, self.high = similarity_range
        self.embedder = load_embedder(folder, dtype_name)

    def similarities(self, images: list[Image.Image], captions: list[list[str]]) -> list[list[float]]:
        flat = [c for caps in captions for c in caps]
        if not flat:
            return [[] for _ in captions]
        owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
        image_ND = self.embedder.images(images, self.batch_size)
        cos = (image_ND[owner] * self.embedder.texts(flat, self.batch_size)).sum(-1).double().tolist()
        out, k = [], 0
        for caps in captions:
            out.append(cos[k : k + len(caps)])
            k += len(caps)
        return out

    def score(self, images: list[Image.Image], captions: list[list[str]]) -> list[list[float]]:
        span = self.high - self.low
        return [[min(1.0, max(0.0, (c - self.low) / span)) for c in row] for row in self.similarities(images, captions)]
