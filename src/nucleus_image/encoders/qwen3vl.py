"""`qwen3-vl`: the released text encoder, Qwen3-VL (`Qwen3VLForConditionalGeneration`), used as the released
pipeline uses it: each prompt wrapped in a chat template with a fixed system prompt, the hidden states of the
8th layer from the end, at most 1024 tokens, padded to a multiple of 8.

Only the text path runs, so only the processor's tokenizer and chat template are needed; we load those from
the pipeline's `processor/` (or `tokenizer/`) folder without the image/video processors (which need
torchvision).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .text import PAD_MULTIPLE, TextEncoder

# The released pipeline's system prompt (diffusers NucleusMoEImagePipeline), verbatim.
SYSTEM_PROMPT = (
    "You are an image generation assistant. Follow the user's prompt literally. Pay careful attention to spatial "
    "layout: objects described as on the left must appear on the left, on the right on the right. Match exact "
    "object counts and assign colors to the correct objects."
)
MAX_LENGTH = 1024
HIDDEN_STATE_INDEX = -8


def load_tokenizer(folder: str | Path):
    """The tokenizer with the chat template from a processor or tokenizer folder."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.chat_template is None:
        # Processor folders may keep the template beside the tokenizer rather than inside its config.
        if (folder / "chat_template.jinja").exists():
            tokenizer.chat_template = (folder / "chat_template.jinja").read_text()
        elif (folder / "chat_template.json").exists():
            tokenizer.chat_template = json.loads((folder / "chat_template.json").read_text())["chat_template"]
        else:
            raise ValueError(
                f"{str(folder)!r} has no chat template (chat_template.jinja/json or in the tokenizer "
                f"config); the Qwen3-VL encoder needs one to format prompts"
            )
    # Right padding keeps every prompt's states independent of its batch-mates (causal attention + mask).
    tokenizer.padding_side = "right"
    return tokenizer


class Qwen3VLTextEncoder(TextEncoder):
    def __init__(
        self,
        model,
        tokenizer,
        max_length: int = MAX_LENGTH,
        hidden_state_index: int = HIDDEN_STATE_INDEX,
        system_prompt: str = SYSTEM_PROMPT,
    ):
        super().__init__()
        num_layers = model.config.text_config.num_hidden_layers
        if not 1 <= abs(hidden_state_index) <= num_layers:
            raise ValueError(
                f"hidden_state_index {hidden_state_index} out of range for a {num_layers}-layer "
                f"text model; accepted: -{num_layers}..-1 or 1..{num_layers}"
            )
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.hidden_state_index = hidden_state_index
        self.system_prompt = system_prompt
        self.dim = model.config.text_config.hidden_size
        self.tokenizer_dir: Path | None = None  # set when loaded from a folder, which saving copies verbatim

    @classmethod
    def from_pretrained(
        cls, text_encoder_dir, tokenizer_dir, dtype: torch.dtype | None = None, device="cpu"
    ) -> Qwen3VLTextEncoder:
        from transformers import Qwen3VLForConditionalGeneration

        model = Qwen3VLForConditionalGeneration.from_pretrained(str(text_encoder_dir), dtype=dtype or "auto")
        encoder = cls(model.to(device), load_tokenizer(tokenizer_dir))
        encoder.tokenizer_dir = Path(tokenizer_dir)
        return encoder

    def format(self, prompt: str) -> str:
        messages = [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": [{"type": "text", "text": prompt}]},
        ]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode_unique(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.format(p) for p in prompts]
        self.warn_truncated(prompts, [len(ids) for ids in self.tokenizer(texts)["input_ids"]])
        inputs = self.tokenizer(
            texts,
            padding="longest",
            pad_to_multiple_of=PAD_MULTIPLE,
            max_length=self.max_length,
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        ).to(self.device)
        outputs = self.model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            use_cache=False,
            return_dict=True,
            output_hidden_states=True,
        )
        return outputs.hidden_states[self.hidden_state_index], inputs["attention_mask"].bool()

    def token_lengths(self, prompts: list[str]) -> list[int]:
        ids = self.tokenizer([self.format(p) for p in prompts])["input_ids"]
        return [min(len(i), self.max_length) for i in ids]

    def config(self) -> dict:
        return {
            "_class_name": "Qwen3VLForConditionalGeneration",
            "max_length": self.max_length,
            "hidden_state_index": self.hidden_state_index,
        }

    def save_pretrained(self, path) -> None:
        self.model.save_pretrained(str(path))

    def save_tokenizer(self, path) -> str:
        """Write the tokenizer folder; returns the class diffusers should load it with."""
        if self.tokenizer_dir is not None:
            # Copy the original processor folder whole (image/video processor configs included) so the saved
            # pipeline still loads in diffusers.
            shutil.copytree(self.tokenizer_dir, path)
            return (
                "Qwen3VLProcessor"
                if (Path(path) / "preprocessor_config.json").exists()
                else type(self.tokenizer).__name__
            )
        self.tokenizer.save_pretrained(str(path))
        return type(self.tokenizer).__name__
