"""The text-encoder interface: prompts in, per-token states and a padding mask out.

Every backend encodes each distinct prompt once per call (a batch of four images of one prompt, or the empty
negative prompt repeated under CFG, costs one encoder row) and pads to a multiple of 8 tokens so attention
shapes come from a small set. Padding is on the right, so a prompt's states never depend on which other prompts
share its batch.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Sequence

import torch
import torch.nn as nn

logger = logging.getLogger(__name__)

PAD_MULTIPLE = 8


def check_prompts(prompts: Sequence[str], what: str = "prompt") -> list[str]:
    """A non-empty list of strings, or a clear ValueError naming what was passed instead."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"{what} must be a list of strings here, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError(f"{what} list is empty; pass at least one prompt")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{what} entries must be strings, got {bad[:3]!r}")
    return list(prompts)


class TextEncoder(nn.Module):
    """Backends implement `encode_unique`; callers use `encode(prompts) -> (states_BLD, mask_BL)`."""

    #: width of the returned states, which must match the transformer's joint_attention_dim
    dim: int
    #: longest token sequence kept; longer prompts are truncated with a warning
    max_length: int

    @abstractmethod
    def encode_unique(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Distinct prompts -> states (N, L, dim) and a bool mask (N, L), L a multiple of 8."""

    def token_lengths(self, prompts: list[str]) -> list[int] | None:
        """Each prompt's token count as `encode_unique` would see it (after truncation), or None when the backend
        cannot tell. Prompts of equal length encode identically alone or together (no padding differs), which
        lets a cache encode them in batches and still store exactly the states of one-at-a-time encoding."""
        return None

    @abstractmethod
    def config(self) -> dict:
        """The JSON-able description `save_pretrained` records (class name and settings)."""

    @abstractmethod
    def save_pretrained(self, path) -> None:
        """Write what `from_pretrained` needs into the folder `path`."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """States (B, L, dim) for every prompt in order, and the mask (B, L), or None when nothing is padding
        (the released pipeline drops an all-ones mask so attention runs unmasked)."""
        prompts = check_prompts(prompts)
        unique = list(dict.fromkeys(prompts))
        states_NLD, mask_NL = self.encode_unique(unique)
        if len(unique) != len(prompts):
            index = torch.tensor([unique.index(p) for p in prompts], device=states_NLD.device)
            states_NLD, mask_NL = states_NLD.index_select(0, index), mask_NL.index_select(0, index)
        return states_NLD, (None if bool(mask_NL.all()) else mask_NL)

    def warn_truncated(self, prompts: list[str], lengths: list[int]) -> None:
        for prompt, length in zip(prompts, lengths):
            if length > self.max_length:
                logger.warning(
                    "prompt of %d tokens truncated to the text limit of %d: %r",
                    length,
                    self.max_length,
                    prompt[:80] + ("..." if len(prompt) > 80 else ""),
                )
