"""LoRA fine-tuning of the Nucleus transformer with peft: adapters (adapters.py) and the fine-tuning run
(finetune.py, `nucleus finetune`)."""

from .adapters import add_lora, load_lora, lora_config, set_lora_scale

__all__ = ["add_lora", "load_lora", "lora_config", "set_lora_scale"]
