"""LoRA adapters on the Nucleus transformer with peft (lora.py), including per-expert factors on 8-bit experts
(quantized_experts.py). Applied from outside the model, like quantization; the runs that train them (`nucleus
finetune`) live in `nucleus_image.lora`, and `NucleusPipeline.load_lora` attaches them for generation."""

from .lora import add_lora, load_lora, lora_config, read_sampler_settings, set_lora_scale, write_sampler_settings

__all__ = ["add_lora", "load_lora", "lora_config", "read_sampler_settings", "set_lora_scale", "write_sampler_settings"]
