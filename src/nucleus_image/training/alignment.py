"""Representation alignment with the synthetic domain's exact maps: a training-only head on a middle block.

REPA (arXiv 2410.06940) speeds up diffusion transformers by aligning a middle block's tokens with a pretrained
vision encoder's patch features. The synthetic domain knows more than any encoder could say: for every image
token, which shape and which colour cover it. So the head here reads block `alignment_block`'s output tokens
(through a forward hook: the model is untouched) and predicts, per token, the share of its pixels that each
shape class (background + 6 shapes) and each colour class (background + 8 colours) covers; the loss is the soft
cross-entropy against those shares, summed over the two maps and averaged over tokens. At high noise a token
cannot know what will be drawn there, and the loss is then the model's best guess of the layout given the
caption, which is what composition needs.

The head lives outside the transformer: the transformer's state dict, `nucleus merge` and every exported pipeline
hold no trace of it (tested). Training checkpoints carry it and its optimizer (`heads.safetensors`, through the
run's `TrainState`) so a resume is exact. Under several processes every rank holds the same head (seeded alike)
and its gradients are averaged over the ranks before each update, so N processes train it as one does (tested).

    cfg = TrainConfig.preset("tiny").override(["alignment_weight=2.0", "alignment_block=2"])  # the preset: 0.5, 1
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..data.synthetic import COLORS, SHAPES, draw_shape

SHAPE_CLASSES = ("background", *SHAPES)
COLOR_CLASSES = ("background", *COLORS)
NUM_TARGETS = len(SHAPE_CLASSES) + len(COLOR_CLASSES)


def fitted_codes(annotations: str | dict, source_size: tuple[int, int], width: int, height: int, code_of) -> np.ndarray:
    """(height, width) int64: each pixel's code, `code_of(index, object)` where an object covers it, else 0.

    The object maps are drawn at the source image's size and fitted to (width, height) the way `fit_image` fits
    the picture (resize to cover, centre crop), so the maps lie on the pixels the model sees."""
    record = json.loads(annotations) if isinstance(annotations, str) else annotations
    src_w, src_h = source_size
    label = Image.new("L", (src_w, src_h), 0)
    draw = ImageDraw.Draw(label)
    for index, obj in enumerate(record["objects"]):
        draw_shape(draw, obj["shape"], tuple(obj["bbox"]), code_of(index, obj))
    scale = max(width / src_w, height / src_h)
    size = (max(width, round(src_w * scale)), max(height, round(src_h * scale)))
    label = label.resize(size, Image.Resampling.NEAREST)
    left, top = (label.width - width) // 2, (label.height - height) // 2
    return np.asarray(label.crop((left, top, left + width, top + height)), dtype=np.int64)


def token_shares(codes: np.ndarray, classes: int, token: int) -> np.ndarray:
    """(tokens, classes) float32: per image token (row-major over the (height/token, width/token) grid, the order
    `pack_latents` gives), the share of its pixels with each code."""
    gh, gw = codes.shape[0] // token, codes.shape[1] // token
    onehot = np.eye(classes, dtype=np.float32)[codes[: gh * token, : gw * token]]  # (H, W, classes)
    return onehot.reshape(gh, token, gw, token, classes).mean((1, 3)).reshape(gh * gw, classes)


def token_targets(
    annotations: str | dict, source_size: tuple[int, int], width: int, height: int, token: int
) -> np.ndarray:
    """(tokens, NUM_TARGETS) float32: per image token, the share of its pixels each shape class and each colour
    class covers (`token_shares` of the fitted maps)."""
    codes = fitted_codes(
        annotations,
        source_size,
        width,
        height,
        lambda _i, obj: 1 + SHAPES.index(obj["shape"]) + len(SHAPE_CLASSES) * (1 + list(COLORS).index(obj["color"])),
    )
    return np.concatenate(
        [
            token_shares(codes % len(SHAPE_CLASSES), len(SHAPE_CLASSES), token),
            token_shares(codes // len(SHAPE_CLASSES), len(COLOR_CLASSES), token),
        ],
        axis=1,
    )


def check_annotations(annotations: list[str | None], option: str = "alignment_weight") -> None:
    """Refuse, before any training, a manifest whose rows lack the synthetic domain's object records."""
    bad = next((i for i, a in enumerate(annotations) if a is None or '"objects"' not in a), None)
    if bad is not None:
        raise ValueError(
            f"{option} > 0 needs every manifest row's object annotations (the synthetic "
            f"domain's shapes, colours and boxes, which `nucleus data synth` writes); row {bad} has "
            f"none. Train on such data with --set {option}=0"
        )


class AlignmentHead(nn.Module):
    """An MLP projector (REPA's form) from a block's tokens to shape and colour logits per token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, NUM_TARGETS))

    def forward(self, tokens_BSD: torch.Tensor) -> torch.Tensor:
        return self.net(tokens_BSD.float())


def alignment_loss(logits_BSK: torch.Tensor, targets_BSK: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy of the shape map plus that of the colour map, mean over tokens."""
    n = len(SHAPE_CLASSES)
    targets = targets_BSK.to(logits_BSK)
    shape = -(targets[..., :n] * F.log_softmax(logits_BSK[..., :n], dim=-1)).sum(-1)
    color = -(targets[..., n:] * F.log_softmax(logits_BSK[..., n:], dim=-1)).sum(-1)
    return (shape + color).mean()


class BlockTap:
    """Keeps the output tokens of one transformer block from the latest forward (a forward hook)."""

    def __init__(self, block: nn.Module):
        self.tokens: torch.Tensor | None = None
        self._handle = block.register_forward_hook(self._keep)

    def _keep(self, _module, _inputs, output) -> None:
        self.tokens = output[0]

    def take(self) -> torch.Tensor:
        if self.tokens is None:
            raise RuntimeError("the tapped block has not run since the last take()")
        tokens, self.tokens = self.tokens, None
        return tokens

    def remove(self) -> None:
        self._handle.remove()


@dataclass(frozen=True)
class AlignmentTerm:
    """What `loss.FlowObjective` needs of the head: the loss of the tapped block's tokens against a batch's
    targets, and its weight in the step's loss."""

    head: AlignmentHead
    tap: BlockTap
    weight: float

    def loss(self, targets_BSK: torch.Tensor | None) -> torch.Tensor:
        if targets_BSK is None:
            raise ValueError("the alignment head needs the batch's token targets (FlowBatch.token_targets_BSK)")
        return alignment_loss(self.head(self.tap.take()), targets_BSK)


def build_alignment(
    cfg, model: nn.Module, device: torch.device, dims=None
) -> tuple[AlignmentTerm, torch.optim.Optimizer] | None:
    """The alignment term of a run whose config weights it (`alignment_weight` > 0; None otherwise) and the
    head's own AdamW (the run's lr schedule reaches it through the step). The head is initialised from the run's
    seed on a forked RNG, so every rank of a sharded run starts from the same head and the run's other random
    streams do not move; with `dims` (several processes) its gradients are averaged over the ranks before each
    update (an optimizer pre-step hook), which is the gradient of the whole batch's loss."""
    if not cfg.alignment_weight:
        return None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = AlignmentHead(cfg.model.hidden_size).to(device)
    opt = torch.optim.AdamW(
        head.parameters(),
        lr=cfg.optimizer.lr,
        betas=cfg.optimizer.betas,
        eps=cfg.optimizer.eps,
        weight_decay=0.0,
        fused=True,
    )
    if dims is not None:
        from ..parallel.collectives import average_gradients_

        params = list(head.parameters())
        opt.register_step_pre_hook(lambda _opt, _args, _kwargs: average_gradients_(params, dims))
    tap = BlockTap(model.transformer_blocks[cfg.alignment_block])
    return AlignmentTerm(head, tap, cfg.alignment_weight), opt
