"""LoRA adapters on the Nucleus transformer with peft, in peft's format (adapter_config.json +
adapter_model.safetensors).

Targets: every attention projection (image q/k/v/out and the text-side add_k/add_v), the dense blocks' SwiGLU and
each MoE layer's shared expert, and the stacked routed experts. The experts are plain (E, in, out) parameters, which
peft (>= 0.17) adapts through `target_parameters`: one rank-r pair of factors per expert, added to that expert's
weight for the batched matmul (peft's ParamWrapper). The router gates, modulation, embeddings and head are not
adapted: routing and timestep conditioning stay the base model's.

On a quantized base (QLoRA: `quantize_transformer(model, "int8")` first) the torchao linears take peft's torchao
LoRA layers and the 8-bit experts a custom peft layer (quantized_experts.py) with the same per-expert factors.

    model = add_lora(transformer, rank=16)             # a peft PeftModel; only the adapters train
    model.save_pretrained("run/adapter")
    load_lora(other_transformer, "run/adapter", scale=0.8)
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

ATTENTION_AND_DENSE = r".*\.attn\.(to_q|to_k|to_v|add_k_proj|add_v_proj|to_out\.0)|.*\.img_mlp\.(shared_expert\.)?net\.(0\.proj|2)"
EXPERT_PARAMETERS = ("img_mlp.experts.gate_up_proj", "img_mlp.experts.down_proj")
QUANTIZED_EXPERTS = r"|.*\.img_mlp\.experts"


def lora_config(rank: int, alpha: float | None = None, quantized: bool = False):
    """peft LoraConfig for the targets above; alpha defaults to the rank (scaling 1). `quantized`: the base holds
    8-bit experts, adapted by the custom layer instead of `target_parameters`."""
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r} (rank 0 is the base model: load it "
                         f"without an adapter)")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=0.0,
                        target_modules=ATTENTION_AND_DENSE + (QUANTIZED_EXPERTS if quantized else ""),
                        target_parameters=None if quantized else list(EXPERT_PARAMETERS))
    return _with_quantized_experts(config) if quantized else config


def _with_quantized_experts(config):
    from nucleus_image.quantization.experts import QuantizedSwiGLUExperts

    from .quantized_experts import QuantizedExpertsLora

    config._register_custom_module({QuantizedSwiGLUExperts: QuantizedExpertsLora})
    return config


def add_lora(model: nn.Module, rank: int, alpha: float | None = None):
    """Wrap `model` (modified in place) with fresh adapters (B = 0, so the output starts equal to the base's);
    every base weight is frozen. Returns the peft PeftModel."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(rank, alpha, quantized=getattr(model, "quantization", None) is not None))


def load_lora(model: nn.Module, path, scale: float = 1.0):
    """Attach a saved adapter to `model` (in place) for inference, its update multiplied by `scale`."""
    from peft import LoraConfig, PeftModel

    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a LoRA adapter folder: no adapter_config.json")
    config = LoraConfig.from_pretrained(str(path))
    if getattr(model, "quantization", None) is not None:
        config = _with_quantized_experts(config)
    peft_model = PeftModel.from_pretrained(model, str(path), config=config, is_trainable=False)
    set_lora_scale(peft_model, scale)
    return peft_model.eval()


def set_lora_scale(peft_model, scale: float) -> None:
    """Multiply every adapter's update by `scale` (0 gives the base model, 1 the adapter as trained)."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                module.set_scale(adapter, scale)
