"""The distillation objective: the student's Euler steps on its own trajectory must land on the teacher's states.

For a batch of teacher trajectories (states x_0 .. x_K at the student's noise levels s_0 = 1 > ... > s_K = 0, the
guided teacher's solution from the same noise and caption) the student starts from the same noise and takes its
K Euler steps with one row per image (no guidance): y_0 = x_0, y_i+1 = y_i + (s_i+1 - s_i) * (-v(y_i, s_i)). Step i
is scored against the teacher's state at the same level, ||y_i+1 - x_i+1||^2. Each step's input is the student's
own previous output, detached (Simple and Fast Distillation, Zhou et al. 2024): the student trains on the states it
will meet when sampling, not only on the teacher's, so its errors do not compound unseen; the gradient of a step
stops at its input, so every step learns to land on the teacher's trajectory from wherever it stands.

`rollout="teacher"` feeds the teacher's states instead (all K steps in one batched forward; exposed to the drift
the student's own steps cause); an option (`--set rollout=teacher`), not the default.

`TrajectoryObjective` is this loss in the shape `training.step.train_step` takes: `(model, TrajectoryBatch) ->
(loss, logged)`, the per-step losses logged as device tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from nucleus_image.diffusion.flow import euler_step

ROLLOUTS = ("student", "teacher")


def student_step(
    model,
    x_BSC: torch.Tensor,
    t: torch.Tensor,
    text_BLD: torch.Tensor,
    mask_BL: torch.Tensor | None,
    img_shapes: list[tuple[int, int, int]],
) -> torch.Tensor:
    """The student's velocity for latents x at pipeline timestep t (one value or one per row), in float32."""
    dtype = next(model.parameters()).dtype
    B = x_BSC.shape[0]
    t_B = t.expand(B) if t.dim() == 0 else t
    return model(
        hidden_states=x_BSC.to(dtype),
        img_shapes=img_shapes,
        encoder_hidden_states=text_BLD.to(dtype),
        encoder_hidden_states_mask=mask_BL,
        timestep=t_B.to(dtype),
    ).sample.float()


def trajectory_loss(
    model,
    teacher_BKSC: torch.Tensor,
    sigma_K1: torch.Tensor,
    t_K: torch.Tensor,
    text_BLD: torch.Tensor,
    mask_BL: torch.Tensor | None,
    img_shapes: list[tuple[int, int, int]],
    rollout: str = "student",
    with_predictions: bool = False,
):
    """Mean over the K steps of the squared distance (per latent value) between the student's next state and the
    teacher's; returns (loss, per-step losses), and with `with_predictions` also each step's x0-prediction
    (K, B, S, C), x + s_i * u from the step's input x (with the graph: distribution_matching.py trains on them).
    `sigma_K1`: the K + 1 shifted levels ending in 0; `t_K`: the timesteps the pipeline gives the transformer at
    the first K of them."""
    if rollout not in ROLLOUTS:
        raise ValueError(f"rollout {rollout!r}; accepted: {', '.join(ROLLOUTS)}")
    B, K1 = teacher_BKSC.shape[:2]
    K = K1 - 1
    if rollout == "teacher":
        # All K steps in one forward of B*K rows, each starting from the teacher's state at its level.
        x_RSC = teacher_BKSC[:, :K].transpose(0, 1).reshape(B * K, *teacher_BKSC.shape[2:])
        t_R = t_K.repeat_interleave(B)
        v = student_step(
            model,
            x_RSC,
            t_R,
            text_BLD.repeat(K, 1, 1),
            None if mask_BL is None else mask_BL.repeat(K, 1),
            img_shapes * K,
        )
        s_R1 = sigma_K1[:K].repeat_interleave(B).view(-1, 1, 1)
        s_next = sigma_K1[1:].repeat_interleave(B).view(-1, 1, 1)
        y_RSC = euler_step(x_RSC, v, s_R1, s_next)
        target = teacher_BKSC[:, 1:].transpose(0, 1).reshape(B * K, *teacher_BKSC.shape[2:])
        per_step = ((y_RSC - target) ** 2).view(K, B, -1).mean(dim=(1, 2))
        if not with_predictions:
            return per_step.mean(), per_step.detach()
        return per_step.mean(), per_step.detach(), (x_RSC + s_R1 * v).view(K, B, *x_RSC.shape[1:])
    y = teacher_BKSC[:, 0]
    losses, predictions = [], []
    for i in range(K):
        v = student_step(model, y, t_K[i], text_BLD, mask_BL, img_shapes)
        y_next = euler_step(y, v, sigma_K1[i], sigma_K1[i + 1])
        losses.append(((y_next - teacher_BKSC[:, i + 1]) ** 2).mean())
        if with_predictions:
            predictions.append(y + sigma_K1[i] * v)
        y = y_next.detach()
    per_step = torch.stack(losses)
    if not with_predictions:
        return per_step.mean(), per_step.detach()
    return per_step.mean(), per_step.detach(), torch.stack(predictions)


@dataclass
class TrajectoryBatch:
    teacher_BKSC: torch.Tensor  # the teacher's states at the K + 1 student levels
    text_BLD: torch.Tensor
    text_mask_BL: torch.Tensor | None
    img_shapes: list[tuple[int, int, int]]
    matching: Any = None  # distribution_matching.MatchingDraws when the run adds that term


@dataclass(frozen=True)
class TrajectoryObjective:
    """The loss function of a distillation step; `sigma_K1` / `t_K` as `trajectory_loss` takes them."""

    sigma_K1: torch.Tensor
    t_K: torch.Tensor
    rollout: str = "student"

    def __call__(self, model, batch: TrajectoryBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, per_step = trajectory_loss(
            model,
            batch.teacher_BKSC,
            self.sigma_K1,
            self.t_K,
            batch.text_BLD,
            batch.text_mask_BL,
            batch.img_shapes,
            self.rollout,
        )
        return loss, {"per_step": per_step}
