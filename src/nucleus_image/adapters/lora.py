"""LoRA adapters on the Nucleus transformer with peft, in peft's format (adapter_config.json +
adapter_model.safetensors).

Targets: every attention projection (image q/k/v/out and the text-side add_k/add_v), the dense blocks' SwiGLU and
each MoE layer's shared expert, and the stacked routed experts. The experts are plain (E, in, out) parameters, which
peft (>= 0.17) adapts through `target_parameters`: one rank-r pair of factors per expert, added to that expert's
weight for the batched matmul (peft's ParamWrapper). The router gates, modulation, embeddings and head are not
adapted: routing and timestep conditioning stay the base model's.

On a quantized base (QLoRA: `quantize_transformer(model, "int8")` first) the torchao linears take peft's torchao
LoRA layers and the 8-bit experts a custom peft layer (quantized_experts.py) with the same per-expert factors.

An adapter may carry the sampler settings it is meant for (a few-step student from `nucleus distill`: steps, noise
levels, guidance) under the key `nucleus_sampler` of its adapter_config.json; `read_sampler_settings` returns them
and `NucleusPipeline.load_lora` makes them the pipeline's defaults. peft itself ignores the key.

    model = add_lora(transformer, rank=16)             # a peft PeftModel; only the adapters train
    model.save_pretrained("run/adapter")
    write_sampler_settings("run/adapter", SamplerSettings(num_inference_steps=4, guidance_scale=1.0))
    load_lora(other_transformer, "run/adapter", scale=0.8)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch.nn as nn

from nucleus_image.diffusion.sampler_settings import SamplerSettings

ATTENTION_AND_DENSE = (
    r".*\.attn\.(to_q|to_k|to_v|add_k_proj|add_v_proj|to_out\.0)|.*\.img_mlp\.(shared_expert\.)?net\.(0\.proj|2)"
)
EXPERT_PARAMETERS = ("img_mlp.experts.gate_up_proj", "img_mlp.experts.down_proj")
CONFIG_FILE = "adapter_config.json"
SAMPLER_KEY = "nucleus_sampler"
QUANTIZED_EXPERTS = r"|.*\.img_mlp\.experts"


def lora_config(rank: int, alpha: float | None = None, quantized: bool = False):
    """peft LoraConfig for the targets above; alpha defaults to the rank (scaling 1). `quantized`: the base holds
    8-bit experts, adapted by the custom layer instead of `target_parameters`."""
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(
            f"LoRA rank must be a positive integer, got {rank!r} (rank 0 is the base model: load it without an adapter)"
        )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=0.0,
        target_modules=ATTENTION_AND_DENSE + (QUANTIZED_EXPERTS if quantized else ""),
        target_parameters=None if quantized else list(EXPERT_PARAMETERS),
    )
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
    fields = _read_config(path)
    fields.pop(SAMPLER_KEY, None)  # ours: read by read_sampler_settings, unknown to peft
    config = LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**fields))
    if getattr(model, "quantization", None) is not None:
        config = _with_quantized_experts(config)
    peft_model = PeftModel.from_pretrained(model, str(path), config=config, is_trainable=False)
    set_lora_scale(peft_model, scale)
    return peft_model.eval()


def adapter_rank(path) -> int:
    """The LoRA rank an adapter folder was saved with (its adapter_config.json's `r`)."""
    fields = _read_config(Path(path))
    rank = fields.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{str(Path(path) / CONFIG_FILE)!r} has no positive integer LoRA rank 'r' (got {rank!r})")
    return rank


def load_adapter_weights(peft_model, path, adapter_name: str = "default") -> None:
    """Copy a saved adapter's weights into `peft_model`'s adapter `adapter_name` (same targets and rank), to train
    on from there; every saved tensor must find its place and every adapter weight must be saved."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(path)
    rank, expected = adapter_rank(path), peft_model.peft_config[adapter_name].r
    if rank != expected:
        raise ValueError(f"adapter {str(path)!r} has rank {rank}; this run's adapter has rank {expected}")
    file = path / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} holds no adapter_model.safetensors")
    saved = load_file(file)
    wanted = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    if saved.keys() != wanted.keys():
        missing, extra = sorted(wanted.keys() - saved.keys()), sorted(saved.keys() - wanted.keys())
        raise ValueError(
            f"adapter {str(path)!r} does not fit this model's adapter: {len(missing)} weights missing "
            f"(e.g. {missing[:2]}), {len(extra)} unknown (e.g. {extra[:2]})"
        )
    shapes = [k for k in saved if saved[k].shape != wanted[k].shape]
    if shapes:
        raise ValueError(f"adapter {str(path)!r}: {len(shapes)} weights of another shape, e.g. {shapes[0]!r}")
    set_peft_model_state_dict(peft_model, saved, adapter_name=adapter_name)


def set_lora_scale(peft_model, scale: float) -> None:
    """Multiply every adapter's update by `scale` (0 gives the base model, 1 the adapter as trained)."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                module.set_scale(adapter, scale)


def _read_config(path: Path) -> dict:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a LoRA adapter folder: no {CONFIG_FILE}")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(file)!r} is not JSON: {err.msg} at line {err.lineno}") from None


def read_sampler_settings(path) -> SamplerSettings | None:
    """The sampler settings an adapter folder carries, or None (an adapter that keeps the base's sampler)."""
    data = _read_config(Path(path)).get(SAMPLER_KEY)
    return None if data is None else SamplerSettings.from_dict(data)


def write_sampler_settings(path, settings: SamplerSettings) -> None:
    """Record `settings` in an adapter folder's adapter_config.json (rewritten atomically)."""
    file = Path(path) / CONFIG_FILE
    data = _read_config(Path(path))
    data[SAMPLER_KEY] = settings.to_dict()
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, file)
