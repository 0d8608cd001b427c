"""A distribution-matching term beside the trajectory loss, as DMD2 trains its few-step students (Yin et al. 2024,
"Improved Distribution Matching Distillation for Fast Image Synthesis").

Why: the trajectory loss asks each student step to land on one teacher state; once the student fits its teacher
trajectories closely (a held-out trajectory loss near 0.012 on the demo model, docs/distillation.md), a lower loss
no longer raises the compositional score. Distribution matching asks something else: that the student's outputs,
re-noised to any level, look to the guided teacher like its own samples. Its gradient on a student sample x0 is
the difference of two denoisers' predictions at a re-noised x_t = (1 - t) x0 + t eps:

    grad = (x0_fake(x_t) - x0_real(x_t)) / mean |x0 - x0_real(x_t)|,    loss = 0.5 * mean (x0 - sg(x0 - grad))^2

whose gradient with respect to x0 is `grad` (per element, over the mean's count): it moves x0 towards what the
real score (the teacher: the base transformer alone, with the teacher's classifier-free guidance) denoises it to
and away from what the fake score denoises it to. The fake score models the student's own output distribution:
the base transformer with a second LoRA adapter (`FAKE_ADAPTER`, starting at zero, so it starts as the unguided
teacher), trained online with the flow-matching loss on the student's detached samples, `fake_updates` steps per
student step (DMD2's two time-scale rule; its paper uses 5). The three networks share one base, so the memory
cost is a second adapter and its optimizer, not a second transformer.

The student's samples: each student step i gives an x0-prediction from where its rollout stands,
x0_i = y_i + s_i * u(y_i, s_i) (the model output u points from noise to data), the sample a K-step student would
finish with if it stopped there; the last step's is its output. Each trajectory of a batch contributes the
prediction of one step drawn per optimizer step (`MatchingDraws.level_B`), so every level of the student learns,
at the cost of one student-sized batch for the fake score, two rows per image for the guided real score, and
`fake_updates` forward-backward passes for the fake score.

Every random draw (the level, t, the noises) is made by the distiller from (seed, step) and carried in the batch,
so a resumed run repeats the same draws.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from nucleus_image.diffusion.guidance import guided, uses_cfg
from nucleus_image.training.config import OptimizerConfig
from nucleus_image.training.step import train_step

from .objective import TrajectoryBatch, TrajectoryObjective, student_step, trajectory_loss

FAKE_ADAPTER = "fake"


@dataclass
class MatchingConfig:
    """The distribution-matching term of `nucleus distill` (`--set matching.weight=...`); weight 0: off."""

    weight: float = 0.0  # the term's weight against the trajectory loss (both are means over latent values)
    fake_updates: int = 1  # fake-score optimizer steps per student step
    fake_rank: int = 0  # the fake score's LoRA rank; 0: the student's
    fake_lr: float = 0.0  # the fake score's learning rate; 0: the student's
    t_min: float = 0.02  # the re-noising level t is drawn uniformly from [t_min, t_max]
    t_max: float = 0.98

    def errors(self) -> list[str]:
        out = []
        if not self.weight >= 0:
            out.append(f"matching.weight={self.weight!r} must be >= 0 (0: no distribution matching)")
        if isinstance(self.fake_updates, bool) or not isinstance(self.fake_updates, int) or self.fake_updates < 1:
            out.append(f"matching.fake_updates={self.fake_updates!r} must be a positive integer")
        if isinstance(self.fake_rank, bool) or not isinstance(self.fake_rank, int) or self.fake_rank < 0:
            out.append(f"matching.fake_rank={self.fake_rank!r} must be an integer >= 0 (0: the student's rank)")
        if not self.fake_lr >= 0:
            out.append(f"matching.fake_lr={self.fake_lr!r} must be >= 0 (0: the student's learning rate)")
        if not 0 < self.t_min <= self.t_max < 1:
            out.append(f"matching t range [{self.t_min!r}, {self.t_max!r}] must satisfy 0 < t_min <= t_max < 1")
        return out

    @property
    def enabled(self) -> bool:
        return self.weight > 0


@dataclass
class MatchingDraws:
    """One optimizer step's random draws for the term (B trajectories, U fake-score updates)."""

    level_B: torch.Tensor  # int64: the student step whose x0-prediction each trajectory contributes
    t_B: torch.Tensor  # the re-noising level of each sample, for both scores
    noise_BSC: torch.Tensor
    fake_t_UB: torch.Tensor  # the fake score's flow-matching levels, one row per update
    fake_noise_UBSC: torch.Tensor
    guided_text_RLD: torch.Tensor  # the captions, then as many empty captions: the real score's 2B rows
    guided_mask_RL: torch.Tensor | None
    step: int  # the student's optimizer step, which the fake score's learning-rate schedule follows


def draw(
    seed: int, cfg: MatchingConfig, batch: int, levels: int, latent_SC: tuple[int, int], device: torch.device | str
) -> dict[str, torch.Tensor]:
    """The step's draws, made on `device` by a generator seeded with `seed` (a function of the run's seed and the
    step: nothing is copied from the host); the text rows are added by the caller."""
    generator = torch.Generator(device=device).manual_seed(seed)
    U = cfg.fake_updates

    def levels_in_range(*shape: int) -> torch.Tensor:
        return cfg.t_min + (cfg.t_max - cfg.t_min) * torch.rand(*shape, generator=generator, device=device)

    return {
        "level_B": torch.randint(levels, (batch,), generator=generator, device=device),
        "t_B": levels_in_range(batch),
        "noise_BSC": torch.randn(batch, *latent_SC, generator=generator, device=device),
        "fake_t_UB": levels_in_range(U, batch),
        "fake_noise_UBSC": torch.randn(U, batch, *latent_SC, generator=generator, device=device),
    }


@contextmanager
def routed_through(model: nn.Module, adapter: str | None) -> Iterator[None]:
    """Run `model`'s peft layers through one adapter (None: the base alone) inside the block. peft's own
    `set_adapter` / `disable_adapter` also flip `requires_grad` on the adapters' weights, which would freeze the
    student's adapter in the middle of its step; this sets only the layers' routing, and restores it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    try:
        for m in layers:
            if adapter is None:
                m._disable_adapters = True
            else:
                m._active_adapter, m._disable_adapters = [adapter], False
        yield
    finally:
        for m, (active, disabled) in zip(layers, saved):
            m._active_adapter, m._disable_adapters = active, disabled


def add_fake_score(model, rank: int, alpha: float | None) -> list[nn.Parameter]:
    """Add the fake score's adapter to the student's peft model (zero at the start, so the fake score starts as the
    unguided base) and return its parameters; the student's adapter stays the active one and both stay trainable."""
    from nucleus_image.adapters.lora import lora_config

    student = [p for p in model.parameters() if p.requires_grad]
    model.add_adapter(
        FAKE_ADAPTER, lora_config(rank, alpha, quantized=getattr(model, "quantization", None) is not None)
    )
    fake = [p for n, p in model.named_parameters() if f".{FAKE_ADAPTER}." in n]
    if not fake:
        raise RuntimeError("peft added no parameters for the fake score's adapter")
    for p in student + fake:
        p.requires_grad_(True)
    return fake


def fake_score_optimizers(model, fake: list[nn.Parameter], cfg: OptimizerConfig, ns_dtype: torch.dtype) -> list:
    """The fake score's optimizers under the student's recipe (`build_optimizers` takes a model's trainable
    parameters: the student's are frozen while it runs, then trainable again)."""
    from nucleus_image.training.optim import build_optimizers

    student = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in fake)]
    for p in student:
        p.requires_grad_(False)
    try:
        muon, adamw, _ = build_optimizers(model, cfg, ns_dtype)
    finally:
        for p in student:
            p.requires_grad_(True)
    return [o for o in (muon, adamw) if o is not None]


@dataclass
class FakeScoreObjective:
    """The fake score's flow-matching loss on the student's detached samples, update `index` of the step."""

    samples_BSC: torch.Tensor
    draws: MatchingDraws
    batch: TrajectoryBatch

    def __call__(self, model, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t_B, noise = self.draws.fake_t_UB[index], self.draws.fake_noise_UBSC[index]
        t = t_B.view(-1, 1, 1)
        x_t = (1 - t) * self.samples_BSC + t * noise
        with routed_through(model, FAKE_ADAPTER):
            u = student_step(model, x_t, t_B, self.batch.text_BLD, self.batch.text_mask_BL, self.batch.img_shapes)
        return ((u - (self.samples_BSC - noise)) ** 2).mean(), {}


@dataclass
class MatchingObjective:
    """The training loss of a distillation step with distribution matching: the trajectory loss plus `weight` times
    the term, in the shape `training.step.train_step` takes. Each call also steps the fake score (its own optimizers
    and learning-rate schedule, through the same `train_step`) on the step's samples, after the student's loss is
    built and before it is backpropagated; the fake score's parameters never enter the student's graph."""

    trajectory: TrajectoryObjective
    cfg: MatchingConfig
    guidance: float  # the real score's classifier-free guidance: the teacher's
    fake_params: list[nn.Parameter]
    fake_optimizers: list[Any]
    fake_optimizer_cfg: OptimizerConfig

    def __call__(self, model, batch: TrajectoryBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        d = batch.matching
        if d is None:
            raise ValueError("a distillation batch without its distribution-matching draws")
        traj = self.trajectory
        loss, per_step, x0_KBSC = trajectory_loss(
            model,
            batch.teacher_BKSC,
            traj.sigma_K1,
            traj.t_K,
            batch.text_BLD,
            batch.text_mask_BL,
            batch.img_shapes,
            traj.rollout,
            with_predictions=True,
        )
        B = x0_KBSC.shape[1]
        x0_BSC = x0_KBSC[d.level_B, torch.arange(B, device=x0_KBSC.device)]
        samples = x0_BSC.detach()
        t = d.t_B.view(-1, 1, 1)
        x_t = (1 - t) * samples + t * d.noise_BSC
        with torch.no_grad():
            with routed_through(model, None):
                u_real = self._real_score(model, x_t, d, batch)
            with routed_through(model, FAKE_ADAPTER):
                u_fake = student_step(model, x_t, d.t_B, batch.text_BLD, batch.text_mask_BL, batch.img_shapes)
            x0_real, x0_fake = x_t + t * u_real, x_t + t * u_fake
            scale = (samples - x0_real).abs().mean(dim=(1, 2), keepdim=True).clamp_min(1e-6)
            grad = torch.nan_to_num((x0_fake - x0_real) / scale)
        matching = 0.5 * ((x0_BSC - (samples - grad)) ** 2).mean()
        fake = self._train_fake(model, samples, d, batch)
        logged = {"per_step": per_step, "matching_grad": grad.abs().mean(), "fake_loss": fake}
        return loss + self.cfg.weight * matching, logged

    def _real_score(self, model, x_t: torch.Tensor, d: MatchingDraws, batch: TrajectoryBatch) -> torch.Tensor:
        """The teacher's guided output at x_t: the conditional and unconditional rows in one forward."""
        if not uses_cfg(self.guidance):
            return student_step(model, x_t, d.t_B, batch.text_BLD, batch.text_mask_BL, batch.img_shapes)
        rows = student_step(
            model,
            torch.cat([x_t, x_t]),
            torch.cat([d.t_B, d.t_B]),
            d.guided_text_RLD,
            d.guided_mask_RL,
            batch.img_shapes * 2,
        )
        return guided(rows, self.guidance)

    def _train_fake(self, model, samples: torch.Tensor, d: MatchingDraws, batch: TrajectoryBatch) -> torch.Tensor:
        objective = FakeScoreObjective(samples, d, batch)
        total = torch.zeros((), device=samples.device)
        for i in range(self.cfg.fake_updates):
            out = train_step(
                model,
                self.fake_optimizers,
                [i],
                objective,
                self.fake_optimizer_cfg,
                d.step,
                params=self.fake_params,
            )
            total = total + out.loss
        for p in self.fake_params:  # nothing of the fake score's is left for the student's clipping to count
            p.grad = None
        return total / self.cfg.fake_updates
