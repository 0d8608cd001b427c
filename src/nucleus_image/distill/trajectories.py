"""The teacher's sampling trajectories at the student's noise levels, generated once, batched, and kept on disk.

The teacher is the pipeline itself, called exactly as it samples (classifier-free guidance with the empty negative
prompt, Euler steps), on a step grid that refines the student's: each of the student's K intervals [s_i, s_i+1]
is split into M equal teacher steps (before the schedule's shift), so the teacher runs K x M steps and passes
through every student noise level. With the default linear levels this is the teacher's own default grid: a
16-step teacher and a 4-step student share linspace(1, 1/16, 16). What is kept per trajectory is the state at
the K + 1 student levels: the noise at s_0 = 1, the K - 1 intermediate states and the image latents at 0.

    store = generate_trajectories(pipe, captions, store_dir, plan)     # resumes: complete shards are kept

Layout of STORE/: `shard-00000.safetensors` (states (n, K + 1, tokens, channels) float32), `shard-00000.json`
(its captions and seeds), `plan.json` (what the store holds: levels, teacher steps and guidance, size). A shard is
written under a temp name and renamed, so a killed run leaves only complete shards; a rerun generates the rest.
Each shard's captions and noise depend only on (seed, shard index), so a resumed store equals a straight one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nucleus_image.data.text_states import CaptionStates
from nucleus_image.training.curriculum import caption_probabilities

PLAN_FILE = "plan.json"


@dataclass(frozen=True)
class TrajectoryPlan:
    """What a trajectory store holds. `student_sigmas`: the student's K noise levels before the shift (the
    terminal 0 is implied); the teacher runs `teacher_steps` (a multiple of K) with `teacher_guidance`."""

    student_sigmas: tuple[float, ...]
    teacher_steps: int
    teacher_guidance: float
    height: int
    width: int
    trajectories: int
    shard_size: int
    seed: int
    caption_weights: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        K = len(self.student_sigmas)
        if K < 1 or self.teacher_steps < K or self.teacher_steps % K:
            raise ValueError(
                f"teacher steps ({self.teacher_steps}) must be a multiple of the student's steps ({K}), "
                f"so the teacher passes through every student noise level; e.g. {4 * K} or {12 * K}"
            )
        if self.trajectories < 1 or self.shard_size < 1:
            raise ValueError(f"trajectories ({self.trajectories}) and shard size ({self.shard_size}) must be >= 1")

    @property
    def num_shards(self) -> int:
        return -(-self.trajectories // self.shard_size)

    def teacher_sigmas(self) -> list[float]:
        """The teacher's levels before the shift: each student interval split into teacher_steps / K equal steps."""
        levels = list(self.student_sigmas) + [0.0]
        per = self.teacher_steps // len(self.student_sigmas)
        return [float(s) for a, b in zip(levels, levels[1:]) for s in np.linspace(a, b, per + 1)[:-1]]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> TrajectoryPlan:
        data = dict(data)
        data["student_sigmas"] = tuple(data["student_sigmas"])
        data["caption_weights"] = tuple(data.get("caption_weights", ()))
        return cls(**data)


def shard_captions(
    plan: TrajectoryPlan, shard: int, row_captions: list[list[str]], row_weights: np.ndarray
) -> list[str]:
    """The captions of one shard's trajectories: rows drawn by `row_weights`, one granularity each by the plan's
    caption weights; a pure function of (seed, shard)."""
    rng = np.random.default_rng([plan.seed, shard])
    count = min(plan.shard_size, plan.trajectories - shard * plan.shard_size)
    rows = rng.choice(len(row_captions), size=count, p=row_weights / row_weights.sum())
    out = []
    for r in rows:
        caps = row_captions[r]
        out.append(caps[int(rng.choice(len(caps), p=caption_probabilities(plan.caption_weights, len(caps))))])
    return out


@torch.no_grad()
def teacher_states(
    pipe, plan: TrajectoryPlan, text: CaptionStates, captions: list[str], noise_BSC: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """(B, K + 1, tokens, channels) float32 teacher states at the student's levels, for the given captions and
    packed noise, the teacher called `batch_size` trajectories at a time."""
    per = plan.teacher_steps // len(plan.student_sigmas)
    sigmas = plan.teacher_sigmas()
    out = []
    for start in range(0, len(captions), batch_size):
        chunk = captions[start : start + batch_size]
        states, mask = text.batch(chunk)
        negative, negative_mask = text.batch([""] * len(chunk))
        x = noise_BSC[start : start + len(chunk)].to(pipe.device)
        kept = [x.float().cpu()]

        def record(_pipe, i, _t, values, kept=kept):
            if (i + 1) % per == 0:
                kept.append(values["latents"].float().cpu())
            return values

        pipe(
            prompt_embeds=states,
            prompt_embeds_mask=mask,
            negative_prompt_embeds=negative,
            negative_prompt_embeds_mask=negative_mask,
            guidance_scale=plan.teacher_guidance,
            sigmas=sigmas,
            height=plan.height,
            width=plan.width,
            latents=x,
            output_type="latent",
            progress=False,
            callback_on_step_end=record,
        )
        out.append(torch.stack(kept, dim=1))
    return torch.cat(out)


def packed_noise(pipe, plan: TrajectoryPlan, shard: int, count: int) -> torch.Tensor:
    """Float32 packed noise for a shard's trajectories from a CPU generator seeded (seed, shard)."""
    cfg = pipe.transformer.config
    tokens = (plan.height // pipe.granularity) * (plan.width // pipe.granularity)
    generator = torch.Generator().manual_seed(int(np.random.default_rng([plan.seed, shard, 1]).integers(2**62)))
    return torch.randn(count, tokens, cfg.in_channels, generator=generator)


def generate_trajectories(
    pipe,
    plan: TrajectoryPlan,
    text: CaptionStates,
    row_captions: list[list[str]],
    row_weights: np.ndarray,
    folder: str | Path,
    batch_size: int = 64,
    log=print,
) -> TrajectoryStore:
    """Fill `folder` with the plan's trajectories (missing shards only) and return the store."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan_file = folder / PLAN_FILE
    if plan_file.exists():
        saved = TrajectoryPlan.from_dict(json.loads(plan_file.read_text()))
        if saved != plan:
            raise ValueError(
                f"{str(folder)!r} holds trajectories of another plan ({saved}); remove it or choose another run folder"
            )
    else:
        _write_atomic(plan_file, json.dumps(plan.to_dict(), indent=1) + "\n")
    for shard in range(plan.num_shards):
        name = folder / f"shard-{shard:05d}"
        if name.with_suffix(".safetensors").exists() and name.with_suffix(".json").exists():
            continue
        captions = shard_captions(plan, shard, row_captions, row_weights)
        noise = packed_noise(pipe, plan, shard, len(captions))
        states = teacher_states(pipe, plan, text, captions, noise, batch_size)
        _write_atomic(name.with_suffix(".json"), json.dumps({"captions": captions}) + "\n")
        tmp = folder / f".tmp-{name.name}-{os.getpid()}.safetensors"
        save_file({"states": states.contiguous()}, tmp)
        os.replace(tmp, name.with_suffix(".safetensors"))
        log(
            f"teacher trajectories: shard {shard + 1}/{plan.num_shards} ({min((shard + 1) * plan.shard_size, plan.trajectories)} "
            f"of {plan.trajectories})"
        )
    return TrajectoryStore(folder)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class TrajectoryStore:
    """Every trajectory of a complete store in memory: `states` (N, K + 1, tokens, channels), `captions` (N)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.plan = TrajectoryPlan.from_dict(json.loads((folder / PLAN_FILE).read_text()))
        states, captions = [], []
        for shard in range(self.plan.num_shards):
            name = folder / f"shard-{shard:05d}"
            if not name.with_suffix(".safetensors").exists():
                raise FileNotFoundError(f"trajectory store {str(folder)!r} lacks shard {shard}; generate it first")
            states.append(load_file(name.with_suffix(".safetensors"))["states"])
            captions += json.loads(name.with_suffix(".json").read_text())["captions"]
        self.states = torch.cat(states)
        self.captions = captions

    def __len__(self) -> int:
        return len(self.captions)
