"""The trainer's view of generation: the pipeline a run's weights make (also what `nucleus merge` saves), and
the sample grid written every `sample_every` steps on fixed prompts and seeds.

The sampling schedule is shifted with the same resolution-dependent mu the training sigmas use
(`TimestepConfig`), so inference spends its steps at the noise levels the model was trained on most.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..diffusion import FlowSchedule
from ..pipeline import NucleusPipeline
from .config import TimestepConfig

GRID_SEEDS = 2  # columns per prompt


def schedule_for(timesteps: TimestepConfig) -> FlowSchedule:
    return FlowSchedule(
        use_dynamic_shifting=True,
        base_shift=timesteps.mu_min,
        max_shift=timesteps.mu_max,
        base_image_seq_len=timesteps.seq_min,
        max_image_seq_len=timesteps.seq_max,
    )


def make_pipeline(model, text_encoder, autoencoder, timesteps: TimestepConfig, resolution: int) -> NucleusPipeline:
    return NucleusPipeline(model, autoencoder, text_encoder, schedule_for(timesteps), sample_size=resolution)


@torch.no_grad()
def sample_grid(
    pipe: NucleusPipeline,
    prompts: list[str],
    states_of: Callable[[str], tuple],
    seed: int,
    steps: int,
    guidance: float,
    path: Path,
    write: bool = True,
) -> Path:
    """Rows = prompts, columns = seeds seed, seed+1; the prompt is written under each row. `states_of(prompt)`
    gives a prompt's (1, L, D) text states and mask (the run's text-state cache: no text encoder needed; the
    empty prompt is the guidance's negative). Uses CPU generators of its own, so the training RNG streams are
    untouched. Without `write` the sampler runs (a process of a sharded model takes part in every forward) but
    decodes nothing and writes nothing."""
    negative, negative_mask = states_of("")
    tiles: list[list[Image.Image]] = []
    for prompt in prompts:
        states, mask = states_of(prompt)
        gens = [torch.Generator("cpu").manual_seed(seed + k) for k in range(GRID_SEEDS)]
        out = pipe(
            prompt_embeds=states,
            prompt_embeds_mask=mask,
            negative_prompt_embeds=negative,
            negative_prompt_embeds_mask=negative_mask,
            num_images_per_prompt=GRID_SEEDS,
            guidance_scale=guidance,
            num_inference_steps=steps,
            generator=gens,
            progress=False,
            output_type="pil" if write else "latent",
        )
        tiles.append(out.images)
    if not write:
        return path
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
