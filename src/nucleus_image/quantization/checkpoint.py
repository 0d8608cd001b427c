"""Quantized transformer folders, and quantizing while loading.

A quantized folder is the diffusers transformer layout plus `quantization_config.json` ({"method": "int8"}):
config.json, then safetensors shards whose torchao weights are flattened into plain tensors (qdata, scale, ...)
with their type in the file's metadata (torchao's `flatten_tensor_state_dict`), and expert codes and scales as
plain tensors. Nothing is pickled; saving is atomic (temporary folder renamed into place).

    model = load_transformer("path/to/transformer", quantize="int8")   # a bf16 folder, quantized while loading
    save_transformer(model, "path/to/int8")                             # the quantized layout below
    model = load_transformer("path/to/int8")                            # loads as it was saved

Loading a high-precision checkpoint with `quantize=` streams it: the model is built on the meta device and each
tensor is quantized the moment it is read, so host memory holds the 8-bit model plus one full-precision tensor,
never the bf16 model whole (34 GB for the release, against about 17 GB quantized).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from nucleus_image.model import NucleusTransformer
from nucleus_image.model.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    QUANTIZATION_CONFIG,
    WEIGHTS_NAME,
    _parse_size,
    _weight_files,
    checked_tensors,
    publish_folder,
    refuse_misfit,
    split_shards,
)
from nucleus_image.model.config import NucleusConfig

from .apply import keeps_precision, quantize_linear, quantized_skeleton
from .experts import QuantizedSwiGLUExperts, check_method

QUANT_CONFIG = QUANTIZATION_CONFIG


def transformer_folder(path, subfolder: str | None = None) -> Path:
    folder = Path(path) / subfolder if subfolder else Path(path)
    if not (folder / CONFIG_NAME).exists() and (folder / "transformer" / CONFIG_NAME).exists():
        folder = folder / "transformer"
    if not (folder / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{str(folder)!r} is not a transformer folder: no {CONFIG_NAME}")
    return folder


def stored_quantization(path, subfolder: str | None = None) -> str | None:
    """The method a saved transformer folder is quantized with, or None for a high-precision folder."""
    folder = Path(path) / subfolder if subfolder else Path(path)
    for candidate in (folder, folder / "transformer"):
        if (candidate / QUANT_CONFIG).exists():
            return check_method(json.loads((candidate / QUANT_CONFIG).read_text())["method"])
        if (candidate / CONFIG_NAME).exists():
            return None
    return None


def load_transformer(
    path, quantize: str | None = None, dtype: torch.dtype | None = None, device="cpu", subfolder: str | None = None
) -> NucleusTransformer:
    """A transformer folder as it was saved (high precision or 8-bit), or a high-precision one quantized tensor by
    tensor while loading when `quantize` ("int8" | "fp8") is given."""
    if quantize is not None or stored_quantization(path, subfolder) is not None:
        return load_quantized(NucleusTransformer, path, quantize, dtype=dtype, device=device, subfolder=subfolder)
    return NucleusTransformer.from_pretrained(path, dtype=dtype, device=device, subfolder=subfolder)


def save_transformer(model: NucleusTransformer, path, max_shard_size: int | str = "10GB") -> None:
    """Write a transformer folder in the layout its weights need: diffusers' for high precision, the quantized
    layout for 8-bit weights."""
    if model.quantization is not None:
        save_quantized(model, path, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)


def _tensor_bytes(t: torch.Tensor) -> int:
    names = getattr(t, "tensor_data_names", None)
    if names is None:
        return t.numel() * t.element_size()
    return sum(_tensor_bytes(getattr(t, n)) for n in names if getattr(t, n, None) is not None)


def save_quantized(model: nn.Module, path, max_shard_size: int | str = "10GB") -> None:
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    path = Path(path)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    shards = split_shards(state, _parse_size(max_shard_size), _tensor_bytes)

    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    (tmp / QUANT_CONFIG).write_text(
        json.dumps(
            {
                "method": model.quantization,
                "format": "torchao-safetensors",
                "high_precision": ["img_in", "proj_out", "*.img_mlp.gate"],
            },
            indent=2,
        )
        + "\n"
    )
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    weight_map = {}
    for name, shard in zip(names, shards):
        flat, metadata = flatten_tensor_state_dict(shard)
        save_file(
            {k: v.contiguous().cpu() for k, v in flat.items()}, str(tmp / name), metadata={"format": "pt", **metadata}
        )
        weight_map.update({k: name for k in flat})
    if len(shards) > 1:
        total = sum(_tensor_bytes(t) for t in state.values())
        (tmp / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    publish_folder(tmp, path)


def load_quantized(
    cls, path, quantize: str | None = None, dtype: torch.dtype | None = None, device="cpu", subfolder: str | None = None
):
    """A quantized model from a quantized folder, or from a high-precision folder quantized while streaming."""
    folder = transformer_folder(path, subfolder)
    stored = stored_quantization(folder)
    if stored is not None:
        if quantize is not None and quantize != stored:
            raise ValueError(
                f"{str(folder)!r} holds {stored} weights; it cannot be loaded as {quantize} (load the "
                f"high-precision checkpoint to quantize it differently)"
            )
        return _load_saved(cls, folder, stored, dtype, device)
    return _load_streaming(cls, folder, check_method(quantize), dtype, device)


def _load_saved(cls, folder: Path, method: str, dtype, device):
    from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict

    config = NucleusConfig.from_json(folder / CONFIG_NAME)
    with torch.device("meta"):
        model = quantized_skeleton(cls(config), method)
    state = {}
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            metadata = f.metadata()
            flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        tensors, leftover = unflatten_tensor_state_dict(flat, metadata)
        if leftover:
            raise ValueError(f"{str(file)!r} has tensors its metadata does not describe: {sorted(leftover)[:10]}")
        state.update(tensors)
    saved_dtype = state["img_in.weight"].dtype
    if dtype is not None and dtype != saved_dtype:
        raise ValueError(
            f"{str(folder)!r} holds {method} weights computing in {saved_dtype}; load it with dtype "
            f"None or {saved_dtype}, not {dtype}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    return _finish(model, method)


def _load_streaming(cls, folder: Path, method: str, dtype, device):
    config = NucleusConfig.from_json(folder / CONFIG_NAME)
    with torch.device("meta"):
        model = cls(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with torch.device("meta"):
        quantized_skeleton(model, method)
    loaded, unexpected, mismatched = set(), [], []
    for key, tensor in checked_tensors(folder, expected, unexpected, mismatched):
        _place(model, key, tensor.to(device=device, dtype=dtype or tensor.dtype), method)
        loaded.add(key)
    refuse_misfit(folder, config, expected, loaded, unexpected, mismatched)
    return _finish(model, method)


def _place(model: nn.Module, key: str, tensor: torch.Tensor, method: str) -> None:
    module_name, _, attr = key.rpartition(".")
    module = model.get_submodule(module_name)
    # A tensor read on the CPU may share the memory-mapped file; a copy lets each shard's mapping close once read.
    tensor = tensor.clone() if tensor.device.type == "cpu" else tensor
    if isinstance(module, QuantizedSwiGLUExperts):
        module.set_weight(attr, tensor)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
        if isinstance(module, nn.Linear) and attr == "weight" and not keeps_precision(module_name):
            quantize_linear(module, method)


def _finish(model: nn.Module, method: str) -> nn.Module:
    model.requires_grad_(False)
    model.quantization = method
    return model.eval()
