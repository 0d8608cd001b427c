"""LoRA fine-tuning of the Nucleus transformer: the run (finetune.py, `nucleus finetune`) that trains the peft
adapters of `nucleus_image.adapters` (re-exported here)."""

from nucleus_image.adapters import (
    add_lora,
    load_lora,
    lora_config,
    read_sampler_settings,
    set_lora_scale,
    write_sampler_settings,
)

__all__ = ["add_lora", "load_lora", "lora_config", "read_sampler_settings", "set_lora_scale", "write_sampler_settings"]
