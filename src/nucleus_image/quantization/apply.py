"""Quantize a finished NucleusTransformer to 8-bit weights, from outside the model.

    model = NucleusTransformer.from_pretrained("path/to/transformer", dtype=torch.bfloat16)
    quantize_transformer(model, "int8")        # or "fp8"

Linear layers get torchao's weight-only configs (`Int8WeightOnlyConfig`: per-output-channel int8;
`Float8WeightOnlyConfig`: float8_e4m3fn), the stacked experts become QuantizedSwiGLUExperts. Three kinds of layer
stay in the model's dtype: each MoE router gate (its logits decide which tokens every expert takes, and a flipped
top-C choice is a discrete error no later layer can undo), the patch embedding `img_in` and the output projection
`proj_out` (the first and last maps of the velocity, small and most sensitive).
"""

from __future__ import annotations

import torch.nn as nn

from nucleus_image.model.moe import SwiGLUExperts

from .experts import QuantizedSwiGLUExperts, check_method

HIGH_PRECISION = ("img_in", "proj_out", "img_mlp.gate")


def keeps_precision(fqn: str) -> bool:
    """True for the linears that stay unquantized (router gates, patch embedding, output projection)."""
    return any(fqn == name or fqn.endswith("." + name) for name in HIGH_PRECISION)


def quantization_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of what 8-bit quantization converts: every stacked-expert module and every nn.Linear but the
    ones `keeps_precision` names. The memory planner counts weight bytes from this same list."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, SwiGLUExperts) or (isinstance(module, nn.Linear) and not keeps_precision(name))
    ]


def torchao_config(method: str):
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig

    return Int8WeightOnlyConfig() if check_method(method) == "int8" else Float8WeightOnlyConfig()


def quantize_linear(linear: nn.Linear, method: str) -> None:
    """Quantize one nn.Linear's weight in place with torchao."""
    from torchao.quantization import quantize_

    quantize_(linear, torchao_config(method))


def quantize_transformer(model: nn.Module, method: str) -> nn.Module:
    """Quantize `model` in place and return it. Its `quantization` attribute records the method, which
    save_transformer writes beside the weights so the folder reloads as the same quantized model."""
    check_method(method)
    if getattr(model, "quantization", None):
        raise ValueError(
            f"the model is already quantized ({model.quantization}); load the high-precision weights "
            f"to quantize them as {method}"
        )
    for name, module in quantization_targets(model):
        if isinstance(module, SwiGLUExperts):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, QuantizedSwiGLUExperts.from_float(module, method))
        else:
            quantize_linear(module, method)
    model.requires_grad_(False)
    model.quantization = method
    return model


def quantized_skeleton(model: nn.Module, method: str) -> nn.Module:
    """Swap the experts of a meta-device model for (meta) quantized ones, the shape a quantized checkpoint fills."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SwiGLUExperts):
            E, D, F2 = module.gate_up_proj.shape
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, QuantizedSwiGLUExperts(D, F2 // 2, E, method))
    return model
