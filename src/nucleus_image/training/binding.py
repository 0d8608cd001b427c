"""Binding each caption word to its own object: a training-only loss on the image-to-text attention of chosen blocks.

Two-object prompts ("a red circle and a blue star") need every image token of the circle to take its content
from "red circle" and not from "blue star". The synthetic domain knows exactly which pixels each object covers
and the caption generator which words name it, so the attention itself can be taught (TokenCompose, arXiv
2312.03626, does this with segmentation masks): for an image token covered by object p, the share of its
attention to the text that falls on p's words should be high. The loss, per block, is

    - sum_{tokens s, objects p} cover[s, p] * log( mean_heads sum_{words l of p} softmax_l(q_s . k_l / sqrt(d)) )
      / sum cover

with the softmax over the caption's (unpadded) text keys: the image keys' share of the attention cancels out of
that ratio, so nothing else of the attention is constrained. Background tokens and captionless rows (caption
dropout) add nothing. The loss reads the block's queries and text keys through forward hooks (`AttentionTap`): the
model is untouched and nothing reaches its weights but the gradients of its own query and key projections.

An object's words: every mention of its shape in the caption ("circle"/"circles") with the colour, size and number
words right before it ("three red circles"); objects of one shape (a counting scene) share their words. Objects
are ordered by first mention, at most `MAX_SLOTS` per caption (the domain's scenes name at most two shapes).

    cfg = TrainConfig.preset("tiny").override(["binding_weight=0.5", "binding_blocks=[1,2]"])
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..data.captions import NUMBER_WORDS, plural
from ..data.synthetic import COLORS, SHAPES, SIZE_CLASSES
from ..model.rope import apply_rope
from .alignment import fitted_codes, token_shares

MAX_SLOTS = 2  # distinct shapes one caption names
MAX_OBJECTS = 4  # objects in one scene (counting scenes)
_MODIFIERS = "|".join((*COLORS, *SIZE_CLASSES, *NUMBER_WORDS.values()))


def object_coverage(
    annotations: str | dict, source_size: tuple[int, int], width: int, height: int, token: int
) -> np.ndarray:
    """(tokens, MAX_OBJECTS) float32: per image token, the share of its pixels each object of the scene covers
    (objects in the annotation's order; columns past the scene's objects are 0)."""
    codes = fitted_codes(annotations, source_size, width, height, lambda index, _obj: index + 1)
    return token_shares(codes, MAX_OBJECTS + 1, token)[:, 1:]


class CaptionWords:
    """Which tokens of a caption name which shape, from the text encoder's tokenizer (character offsets), cached
    per caption."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[str, list[tuple[str, list[int]]]] = {}
        # Not "square" as the picture's framing ("the picture is square, 1:1", "a square 1:1 frame").
        self._patterns = {
            s: re.compile(rf"\b(?:(?:{_MODIFIERS})\s+){{0,3}}(?:{s}|{plural(s)})\b(?!,? \d)") for s in SHAPES
        }

    def slots(self, caption: str) -> list[tuple[str, list[int]]]:
        """[(shape, token indices)] for the shapes the caption names, in order of first mention."""
        if caption not in self._cache:
            text = caption.lower()
            spans = []
            for shape, pattern in self._patterns.items():
                found = [m.span() for m in pattern.finditer(text)]
                if found:
                    spans.append((found[0][0], shape, found))
            offsets = self.tokenizer(caption, return_offsets_mapping=True)["offset_mapping"]
            slots = []
            for _, shape, found in sorted(spans)[:MAX_SLOTS]:
                tokens = [i for i, (a, b) in enumerate(offsets) if b > a and any(s <= a and b <= e for s, e in found)]
                slots.append((shape, tokens))
            self._cache[caption] = slots
        return self._cache[caption]


def binding_targets(
    words: CaptionWords, captions: list[str], shapes: list[list[str]], coverage_BSO: torch.Tensor, text_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cover (B, S, MAX_SLOTS), words (B, text_len, MAX_SLOTS)) for a micro-batch: how much of each image token
    each named shape's objects cover, and which text tokens name it. `shapes[i]`: row i's objects' shapes in the
    annotation's order, the columns of `coverage_BSO`."""
    B, S, _ = coverage_BSO.shape
    cover = torch.zeros(B, S, MAX_SLOTS)
    named = torch.zeros(B, text_len, MAX_SLOTS)
    for i, (caption, row_shapes) in enumerate(zip(captions, shapes)):
        for p, (shape, tokens) in enumerate(words.slots(caption)):
            objects = [o for o, s in enumerate(row_shapes) if s == shape]
            if objects and tokens:
                cover[i, :, p] = coverage_BSO[i, :, objects].sum(-1)
                named[i, [t for t in tokens if t < text_len], p] = 1.0
    return cover, named


def binding_loss(
    q_BHSd: torch.Tensor,
    txt_k_BKLd: torch.Tensor,
    text_mask_BL: torch.Tensor | None,
    cover_BSP: torch.Tensor,
    named_BLP: torch.Tensor,
) -> torch.Tensor:
    """The loss of the module docstring for one block's rotated queries and text keys (grouped-query heads: query
    head h reads key head h // (H / K), as the attention does)."""
    H, K = q_BHSd.shape[1], txt_k_BKLd.shape[1]
    k = txt_k_BKLd.repeat_interleave(H // K, dim=1) if H != K else txt_k_BKLd
    logits = (q_BHSd.float() @ k.float().transpose(-1, -2)) / math.sqrt(q_BHSd.shape[-1])  # (B, H, S, L)
    if text_mask_BL is not None:
        # Finite, so no log-sum-exp below meets only -inf (whose gradient is NaN); exp(-1e9) is 0 all the same.
        logits = logits.masked_fill(~text_mask_BL[:, None, None, :], -1e9)
    logp = torch.logsumexp(torch.log_softmax(logits, dim=-1), dim=1) - math.log(H)  # (B, S, L): mean over heads
    # log of the attention share on each slot's words; a slot without words gets ~-69 (finite), and weight 0.
    own = torch.logsumexp(logp[..., None] + torch.log(named_BLP.to(logp).clamp_min(1e-30))[:, None], dim=2)
    cover = cover_BSP.to(logp)
    return -(cover * own).sum() / cover.sum().clamp_min(1.0)


class AttentionTap:
    """Keeps a block attention's rotated queries and text keys from the latest forward (forward hooks on the
    attention and on its query norm), so a loss can recompute its text logits after the model's forward."""

    def __init__(self, attn: nn.Module):
        self.q: torch.Tensor | None = None
        self._inputs: tuple | None = None
        self._handles = [
            attn.register_forward_pre_hook(self._keep_inputs),
            attn.norm_q.register_forward_hook(self._keep_q),
        ]

    def _keep_inputs(self, _module, args) -> None:
        self._inputs = args  # (x_BSD, img_rot, txt_k, txt_v, mask)

    def _keep_q(self, _module, _inputs, output) -> None:
        self.q = output  # (B, S, H, d), normed, before the rotation

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rotated queries (B, H, S, d), text keys (B, K, L, d)) of the latest forward."""
        if self.q is None or self._inputs is None:
            raise RuntimeError("the tapped attention has not run since the last take()")
        _, img_rot, txt_k, _, _ = self._inputs
        q = apply_rope(self.q.transpose(1, 2), img_rot)
        self.q = self._inputs = None
        return q, txt_k

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@dataclass(frozen=True)
class BindingTerm:
    """What `loss.FlowObjective` needs: the taps of the chosen blocks and the loss's weight."""

    taps: tuple[AttentionTap, ...]
    weight: float

    def loss(
        self, text_mask_BL: torch.Tensor | None, targets: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        if targets is None:
            raise ValueError("the binding loss needs the batch's binding targets (FlowBatch.binding_targets)")
        cover, named = targets
        return torch.stack([binding_loss(*tap.take(), text_mask_BL, cover, named) for tap in self.taps]).mean()


def caption_tokenizer(cfg):
    """The tokenizer whose positions the cached text states have (the minilm encoder's)."""
    if cfg.text_encoder != "minilm":
        raise ValueError(
            f"binding_weight > 0 needs the minilm text encoder (its token offsets name the words); "
            f"text_encoder is {cfg.text_encoder!r}. Set binding_weight=0"
        )
    from transformers import AutoTokenizer

    from ..encoders.minilm import bundled_model_path

    return AutoTokenizer.from_pretrained(str(bundled_model_path()))


def build_binding(cfg, model: nn.Module) -> tuple[BindingTerm, CaptionWords] | None:
    """The binding term of a run whose config weights it (`binding_weight` > 0; None otherwise): taps on the
    attention of `binding_blocks`, and the caption-word finder the data path uses."""
    if not cfg.binding_weight:
        return None
    taps = tuple(AttentionTap(model.transformer_blocks[b].attn) for b in cfg.binding_blocks)
    return BindingTerm(taps, cfg.binding_weight), CaptionWords(caption_tokenizer(cfg))
