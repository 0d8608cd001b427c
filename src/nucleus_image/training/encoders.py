"""The frozen encoders a training run uses: built in (MiniLM text, pixel space-to-depth) or read from a
diffusers pipeline folder (the released Qwen3-VL text encoder and Qwen-Image VAE), checked against the model's
widths before the model is built."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import TrainConfig

# Encoders a preset may name, taken from the pipeline folder `pipeline_dir`: (component, class in model_index.json).
PIPELINE_ENCODERS = {
    "qwen3-vl": ("text_encoder", "Qwen3VLForConditionalGeneration"),
    "qwen-image": ("vae", "AutoencoderKLQwenImage"),
}


def build_encoders(cfg: TrainConfig, device: torch.device, load_text_encoder: bool = True):
    """The frozen text encoder and the autoencoder the config names, checked against the model's widths (before
    the model is built: a mismatch must not cost building a large model first). Without `load_text_encoder` the
    text encoder is None: training reads its states from the text-state cache, so only the process that fills
    the cache (rank 0, when a caption is missing) loads it, and only until it is filled."""
    if not load_text_encoder:
        text_encoder = None
    elif cfg.text_encoder == "minilm":
        from ..encoders.minilm import MiniLMTextEncoder

        text_encoder = MiniLMTextEncoder()
    else:
        text_encoder = from_pipeline_folder(cfg.text_encoder, "text_encoder", device, cfg.pipeline_dir)
    if cfg.autoencoder == "pixel":
        from ..encoders.pixel import PixelAutoencoder

        # Space-to-depth of RGB: the factor follows from the model's latent channels (3 * factor^2).
        factor = round(math.sqrt(cfg.model.latent_channels / 3))
        autoencoder = PixelAutoencoder(factor=max(factor, 1))
    else:
        autoencoder = from_pipeline_folder(cfg.autoencoder, "vae", device, cfg.pipeline_dir)
    autoencoder = autoencoder.to(device).eval().requires_grad_(False)
    m = cfg.model
    if text_encoder is not None:
        text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        check_text_width(cfg, text_encoder.dim)
    if autoencoder.latent_channels * m.patch_size**2 != m.in_channels:
        raise ValueError(
            f"autoencoder {cfg.autoencoder!r} has {autoencoder.latent_channels} latent channels; the model "
            f"needs in_channels/patch_size^2 = {m.in_channels // m.patch_size**2}"
        )
    return text_encoder, autoencoder


def check_text_width(cfg: TrainConfig, width: int) -> None:
    """Refuse text states of another width than the model's `joint_attention_dim`."""
    if width != cfg.model.joint_attention_dim:
        raise ValueError(
            f"text encoder {cfg.text_encoder!r} gives {width}-wide states but the model's "
            f"joint_attention_dim is {cfg.model.joint_attention_dim}"
        )


def text_encoder_spec(cfg: TrainConfig) -> str:
    """The text encoder as the text-state cache names it: 'minilm' or 'pipeline:DIR'."""
    if cfg.text_encoder in PIPELINE_ENCODERS and cfg.pipeline_dir:
        return f"pipeline:{cfg.pipeline_dir}"
    return cfg.text_encoder


def from_pipeline_folder(spec: str, component: str, device, pipeline_dir: str = ""):
    """`component` of a pipeline folder named by `spec`: 'pipeline:DIR', or a known encoder name read from
    `pipeline_dir` (checked to hold that class)."""
    from ..pipeline.folder import load_components, read_index

    named = {name for name, (comp, _) in PIPELINE_ENCODERS.items() if comp == component}
    if spec.startswith("pipeline:"):
        folder = spec.split(":", 1)[1]
    elif spec in named:
        if not pipeline_dir:
            raise ValueError(
                f"{component} {spec!r} is read from a pipeline folder: pass --set pipeline_dir=DIR (a "
                f"diffusers Nucleus-Image folder with model_index.json)"
            )
        folder = pipeline_dir
        found = (read_index(Path(folder)).get(component) or [None, None])[1]
        if found != PIPELINE_ENCODERS[spec][1]:
            raise ValueError(
                f"{component} {spec!r} needs a {PIPELINE_ENCODERS[spec][1]} in pipeline_dir "
                f"{folder!r}, which holds {found!r}"
            )
    else:
        builtin = "minilm" if component == "text_encoder" else "pixel"
        raise ValueError(
            f"unknown {component} {spec!r}; accepted: {builtin!r} (built in), "
            f"{', '.join(repr(n) for n in sorted(named))} (from pipeline_dir) or 'pipeline:DIR'"
        )
    # Frozen and only run once per caption/image: bf16 on GPU keeps a 8B-parameter text encoder affordable.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return load_components(
        folder, dtype, device, load_text_encoder=component == "text_encoder", load_transformer=False
    )[component]
