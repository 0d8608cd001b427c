"""LoRA fine-tuning of the Nucleus transformer with peft: adapters (adapters.py) and the fine-tuning run
(finetune.py, `nucleus finetune`)."""

from .adapters import add_lora, load_lora, lora_config, read_sampler_settings, set_lora_scale, write_sampler_settings

__all__ = ["add_lora", "load_lora", "lora_config", "read_sampler_settings", "set_lora_scale", "write_sampler_settings"]
