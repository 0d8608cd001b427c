"""A vision-language model writing captions at three granularities (short, medium, detailed) for the images that
need one, each recorded with its provenance.

Any model transformers' AutoModelForImageTextToText loads with an AutoProcessor that has a chat template
(LLaVA, Qwen2-VL / Qwen2.5-VL, ...), from safetensors. Each prompt in captioner.prompts is asked as one user turn
holding the image, answered greedily (no sampling: the same image gets the same caption on every engine) with
up to the matching captioner.max_new_tokens, in batches of `model_batch_size` images. A caption's source is
"vlm:<folder name>@<first 12 hex of the folder's sha256>:<short|medium|detailed>"; the manifest's provenance
holds the full digest, the folder path and the transformers version that wrote the model.

    cfg = CurateConfig.from_dict({"captioner": {"model": "models/llava-1.5-7b-hf", "when": "needed"}})
"""

from __future__ import annotations

import unicodedata

import torch
from PIL import Image

from nucleus_image.data.curate.config import CaptionerConfig
from nucleus_image.data.curate.model_folders import device_and_dtype

GRANULARITY_NAMES = ("short", "medium", "detailed")


class VlmCaptioner:
    def __init__(self, folder: str, name: str, cfg: CaptionerConfig, batch_size: int, dtype_name: str):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.name, self.cfg, self.batch_size = name, cfg, batch_size
        self.device, self.dtype = device_and_dtype(dtype_name)
        self.model = AutoModelForImageTextToText.from_pretrained(
            folder, use_safetensors=True, dtype=self.dtype, local_files_only=True
        )
        self.model = self.model.to(self.device).eval()
        self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
        self.pad_token_id = self.processor.tokenizer.pad_token_id
        if self.pad_token_id is None:
            self.pad_token_id = self.processor.tokenizer.eos_token_id
        self.prompts = [
            self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
            for prompt in cfg.prompts
        ]

    @torch.inference_mode()
    def _generate(self, images: list[Image.Image], prompt: str, max_new_tokens: int) -> list[str]:
        inputs = self.processor(images=images, text=[prompt] * len(images), return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=self.pad_token_id
        )
        return self.processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)

    def caption(self, images: list[Image.Image]) -> list[list[tuple[str, str]]]:
        """Per image, its (caption, source) pairs in the order short, medium, detailed; empty answers left out."""
        out: list[list[tuple[str, str]]] = [[] for _ in images]
        for granularity, prompt, max_new in zip(GRANULARITY_NAMES, self.prompts, self.cfg.max_new_tokens):
            for start in range(0, len(images), self.batch_size):
                texts = self._generate(images[start : start + self.batch_size], prompt, max_new)
                for i, text in enumerate(texts, start):
                    text = " ".join("".join(c for c in text if unicodedata.category(c) != "Cc").split())
                    if text:
                        out[i].append((text, f"vlm:{self.name}:{granularity}"))
        return out
