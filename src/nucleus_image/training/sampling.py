"""The trainer's view of generation: the pipeline a run's weights make (also what `nucleus merge` saves), and
the sample grid written every `sample_every` steps on fixed prompts and seeds.

The sampling schedule is shifted with the same resolution-dependent mu the training sigmas use
(`TimestepConfig`), so inference spends its steps at the noise levels the model was trained on most.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..diffusion import FlowSchedule
from ..pipeline import NucleusPipeline
from .config import TimestepConfig

GRID_SEEDS = 2  # columns per prompt


def schedule_for(timesteps: TimestepConfig) -> FlowSchedule:
    return FlowSchedule(use_dynamic_shifting=True, base_shift=timesteps.mu_min, max_shift=timesteps.mu_max,
                        base_image_seq_len=timesteps.seq_min, max_image_seq_len=timesteps.seq_max)


def make_pipeline(model, text_encoder, autoencoder, timesteps: TimestepConfig, resolution: int) -> NucleusPipeline:
    return NucleusPipeline(model, autoencoder, text_encoder, schedule_for(timesteps), sample_size=resolution)


@torch.no_grad()
def sample_grid(pipe: NucleusPipeline, prompts: list[str], seed: int, steps: int, guidance: float, path: Path) -> Path:
    """Rows = prompts, columns = seeds seed, seed+1; the prompt is written under each row. Uses CPU generators
    of its own, so the training RNG streams are untouched."""
    tiles: list[list[Image.Image]] = []
    for prompt in prompts:
        gens = [torch.Generator("cpu").manual_seed(seed + k) for k in range(GRID_SEEDS)]
        out = pipe([prompt] * GRID_SEEDS, guidance_scale=guidance, num_inference_steps=steps, generator=gens,
                   progress=False)
        tiles.append(out.images)
    w, h = tiles[0][0].size
    scale = max(1, 96 // max(w, h))  # small models sample tiny images: enlarge so the grid is legible
    tw, th, caption = w * scale, h * scale, 14
    grid = Image.new("RGB", (GRID_SEEDS * tw, len(prompts) * (th + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (prompt, row) in enumerate(zip(prompts, tiles)):
        y = r * (th + caption)
        for c, im in enumerate(row):
            grid.paste(im.resize((tw, th), Image.Resampling.NEAREST), (c * tw, y))
        draw.text((2, y + th + 1), prompt[: 6 * GRID_SEEDS * tw // 36], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
