"""Learned-model folders for curation: checked when the pipeline is built, before any image is read, and named
by a content digest for provenance.

A folder is what `save_pretrained` writes for a transformers model and its processor: config.json, weights as
safetensors (model.safetensors, or shards with model.safetensors.index.json), the processor's files
(preprocessor / processor config, tokenizer). Pickled weights (pytorch_model.bin) are never loaded. An aesthetic
folder also holds aesthetic_head.safetensors (see `clip_scoring`).

    info = check_folder("models/clip-vit-l14", "quality.model")   # raises ValueError naming what is wrong
    info.label                                                   # "clip-vit-l14@3f9c0a1b2d4e"
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

AESTHETIC_HEAD = "aesthetic_head.safetensors"
CLIP_TYPES = ("clip", "siglip")  # config.json model_type of the image-text models
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt")
# What each config key needs, for the error messages.
EXPECTED = {
    "quality.model": f"a CLIP or SigLIP folder written by save_pretrained (config.json, *.safetensors weights, "
    f"processor and tokenizer files) holding {AESTHETIC_HEAD}",
    "captions.model": "a CLIP or SigLIP folder written by save_pretrained (config.json, *.safetensors weights, "
    "processor and tokenizer files)",
    "captioner.model": "a vision-language model folder written by save_pretrained (config.json of a model "
    "AutoModelForImageTextToText loads, *.safetensors weights, a processor with a chat template)",
}


@dataclass(frozen=True)
class FolderInfo:
    path: str  # absolute
    name: str  # the folder's name
    sha256: str  # digest of every file's relative path and content
    model_type: str  # config.json model_type
    transformers_version: str | None  # the version that wrote config.json

    @property
    def label(self) -> str:
        return f"{self.name}@{self.sha256[:12]}"

    def provenance(self) -> dict:
        return {
            "path": self.path,
            "name": self.name,
            "sha256": self.sha256,
            "model_type": self.model_type,
            "transformers_version": self.transformers_version,
        }


def _fail(key: str, folder: Path, problem: str) -> ValueError:
    return ValueError(f"{key} {str(folder)!r}: {problem}; expected {EXPECTED[key]}")


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=8)
def _info(folder: str, stamp: tuple) -> FolderInfo:
    """Cached per folder state (`stamp`: every file's name, size and mtime), so a worker hashes a folder once."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return FolderInfo(
        folder, Path(folder).name, _digest(Path(folder)), config["model_type"], config.get("transformers_version")
    )


def folder_info(folder: str | Path) -> FolderInfo:
    path = Path(folder).resolve()
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*")) if p.is_file())
    return _info(str(path), stamp)


def _check_safetensors(key: str, folder: Path, files: list[Path]) -> None:
    from safetensors import safe_open

    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except Exception as err:  # safetensors raises its own error types for a bad header or short file
            raise _fail(key, folder, f"{path.name} is not a readable safetensors file ({err})") from None


def _check_weights(key: str, folder: Path) -> None:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as err:
            raise _fail(key, folder, f"{index.name} is not a safetensors index ({err})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise _fail(key, folder, f"weight shards listed in {index.name} are missing: {missing}")
        _check_safetensors(key, folder, [folder / s for s in shards])
    elif (folder / "model.safetensors").is_file():
        _check_safetensors(key, folder, [folder / "model.safetensors"])
    else:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        problem = (
            f"has only pickled weights {pickled}, which are never loaded (convert them to safetensors)"
            if pickled
            else "has no model.safetensors or model.safetensors.index.json"
        )
        raise _fail(key, folder, problem)


def _check_head(folder: Path, embed_dim: int) -> None:
    path = folder / AESTHETIC_HEAD
    if not path.is_file():
        raise _fail("quality.model", folder, f"has no {AESTHETIC_HEAD}")
    _check_safetensors("quality.model", folder, [path])
    from safetensors.torch import load_file

    try:
        head_layers(load_file(str(path)), embed_dim)
    except ValueError as err:
        raise _fail("quality.model", folder, f"{AESTHETIC_HEAD}: {err}") from None


def check_folder(folder: str | Path, key: str) -> FolderInfo:
    """Everything that can be checked without running the model: the folder, its config, its weight files'
    headers, the processor (loaded), and for quality.model the aesthetic head's shapes. Raises ValueError."""
    path = Path(folder).resolve()
    if not path.is_dir():
        raise _fail(key, path, "is not a folder" if path.exists() else "does not exist")
    try:
        config = json.loads((path / "config.json").read_text())
        model_type = config["model_type"]
    except FileNotFoundError:
        raise _fail(key, path, "has no config.json") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise _fail(key, path, f"config.json is not a model config ({type(err).__name__}: {err})") from None
    if key == "captioner.model":
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
            raise _fail(key, path, f"model_type {model_type!r} is not an image-text-to-text model")
    elif model_type not in CLIP_TYPES:
        raise _fail(key, path, f"model_type {model_type!r} is not one of {list(CLIP_TYPES)}")
    _check_weights(key, path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        # transformers would build an empty tokenizer from the processor config alone, and run on it
        raise _fail(key, path, f"has no tokenizer files (one of {list(TOKENIZER_FILES)})")
    try:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError... for a broken processor
        raise _fail(key, path, f"its processor does not load ({type(err).__name__}: {err})") from None
    if key == "captioner.model" and not getattr(processor, "chat_template", None):
        raise _fail(key, path, "its processor has no chat template (chat_template.jinja or in processor_config)")
    missing = [a for a in ("image_processor", "tokenizer") if getattr(processor, a, None) is None]
    if missing:
        raise _fail(key, path, f"its processor ({type(processor).__name__}) has no {' or '.join(missing)}")
    if key == "quality.model":
        _check_head(path, embed_dim(config))
    return folder_info(path)


def embed_dim(config: dict) -> int:
    """Width of the image embedding: CLIP's projection_dim, SigLIP's vision hidden size."""
    if config["model_type"] == "clip":
        return int(config.get("projection_dim", 512))
    return int(config.get("vision_config", {}).get("hidden_size", 768))


def head_layers(state: dict, embed_dim: int) -> list[tuple]:
    """The aesthetic head as [(weight_OI, bias_O), ...] in application order, from a safetensors state dict in
    one of the common layouts: a single linear layer ("weight", "bias"; LAION aesthetic v1) or an
    nn.Sequential's linear layers ("layers.N.weight", "layers.N.bias"; the LAION improved aesthetic predictor,
    whose dropouts hold no weights and which has no activations between its layers). The first layer takes the
    L2-normalised image embedding (embed_dim wide); the last gives one score."""
    if set(state) == {"weight", "bias"}:
        pairs = [(state["weight"], state["bias"])]
    else:
        found = [re.fullmatch(r"layers\.(\d+)\.(weight|bias)", k) for k in state]
        indices = sorted({int(m.group(1)) for m in found if m})
        if not indices or set(state) != {f"layers.{i}.{p}" for i in indices for p in ("weight", "bias")}:
            raise ValueError(f"expected keys weight + bias, or layers.N.weight + layers.N.bias; got {sorted(state)}")
        pairs = [(state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]) for i in indices]
    width = embed_dim
    for n, (w, b) in enumerate(pairs):
        if w.ndim != 2 or w.shape[1] != width or tuple(b.shape) != (w.shape[0],):
            raise ValueError(
                f"layer {n} has weight {tuple(w.shape)} and bias {tuple(b.shape)}; expected (N, {width}) and (N,) "
                f"(the image embedding is {embed_dim} wide)"
            )
        width = w.shape[0]
    if width != 1:
        raise ValueError(f"the last layer gives {width} outputs; expected 1 score")
    return pairs


def device_and_dtype(dtype_name: str):
    """CUDA where present (a Ray actor given a GPU sees exactly that one), else CPU; CPU always runs float32."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda"), getattr(torch, dtype_name)
    return torch.device("cpu"), torch.float32


def check_all(folders: dict[str, str]) -> dict[str, FolderInfo]:
    """check_folder for each {config key: folder}; the first problem raises."""
    return {key: check_folder(folder, key) for key, folder in folders.items()}
