"""Flow-matching sampling schedule and the Euler step, as the released Nucleus-Image pipeline uses them.

The noisy latent at noise level sigma is x_sigma = (1 - sigma) * x0 + sigma * noise. The released schedule is
sigmas = linspace(1, 1/N, N) followed by a terminal 0, optionally shifted (a static `shift`, or a resolution-
dependent one whose mu grows linearly with the image sequence length). The transformer is called with t = sigma,
and its output points from noise towards data, so the released sampler negates it before the Euler step:

    x_next = x + (sigma_next - sigma) * (-model_output)

    python -c "from nucleus_image.diffusion.flow import FlowSchedule; print(FlowSchedule().sigmas(8))"
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# Scheduler-config keys that change the schedule in ways we do not implement; refusing them beats silently
# sampling a different schedule than the checkpoint was published with.
_UNSUPPORTED_FLAGS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


def resolution_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """mu grows linearly from `base_shift` at `base_seq_len` image tokens to `max_shift` at `max_seq_len`."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


@dataclass(frozen=True)
class FlowSchedule:
    """The sampling schedule; fields mirror diffusers' FlowMatchEulerDiscreteScheduler config keys."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None

    def __post_init__(self) -> None:
        if self.time_shift_type not in ("exponential", "linear"):
            raise ValueError(
                f"time_shift_type {self.time_shift_type!r} is not supported; use 'exponential' or 'linear'"
            )
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.max_image_seq_len <= self.base_image_seq_len:
            raise ValueError(
                f"max_image_seq_len ({self.max_image_seq_len}) must exceed base_image_seq_len "
                f"({self.base_image_seq_len})"
            )
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in [0, 1), got {self.shift_terminal}")

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> FlowSchedule:
        """Build from a diffusers scheduler_config.json dict; unknown bookkeeping keys are ignored."""
        enabled = [key for key in _UNSUPPORTED_FLAGS if config.get(key)]
        if enabled:
            raise ValueError(
                f"scheduler config enables {enabled}, which the Nucleus sampler does not implement; "
                f"supported: static shift, use_dynamic_shifting, shift_terminal"
            )
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in config.items() if key in names and value is not None})

    def to_config(self) -> dict[str, Any]:
        """A scheduler_config.json that diffusers' FlowMatchEulerDiscreteScheduler loads to the same schedule."""
        return {"_class_name": "FlowMatchEulerDiscreteScheduler", **dataclasses.asdict(self)}

    def mu(self, image_seq_len: int) -> float:
        return resolution_shift_mu(
            image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift, self.max_shift
        )

    def sigmas(
        self, num_steps: int | None = None, image_seq_len: int | None = None, sigmas: Sequence[float] | None = None
    ) -> torch.Tensor:
        """(N + 1,) float32 noise levels from the first step down to the terminal 0.

        `sigmas` overrides the released linspace(1, 1/N, N); the configured shift applies to either. The float32
        arithmetic (numpy, in diffusers' order) makes the two schedules agree bit for bit.
        """
        if sigmas is None:
            if num_steps is None or num_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive integer, got {num_steps}")
            # numpy's linspace, because torch's rounds its second half differently in the last bit.
            sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps)
        sigma_N = np.asarray(sigmas, dtype=np.float64).astype(np.float32)
        if self.use_dynamic_shifting:
            if image_seq_len is None:
                raise ValueError("a resolution-dependent shift (use_dynamic_shifting) needs the image sequence length")
            sigma_N = self._time_shift(self.mu(image_seq_len), sigma_N)
        else:
            sigma_N = self.shift * sigma_N / (1 + (self.shift - 1) * sigma_N)
        if self.shift_terminal is not None:
            one_minus = 1 - sigma_N
            if one_minus[-1] == 0:
                raise ValueError(
                    f"shift_terminal={self.shift_terminal} needs a last sigma below 1, got sigmas "
                    f"{sigma_N.tolist()}; use more than one step"
                )
            sigma_N = 1 - one_minus / (one_minus[-1] / (1 - self.shift_terminal))
        return torch.cat([torch.from_numpy(np.asarray(sigma_N, dtype=np.float32)), torch.zeros(1)])

    def _time_shift(self, mu: float, sigma_N: np.ndarray) -> np.ndarray:
        if self.time_shift_type == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / sigma_N - 1))
        return mu / (mu + (1 / sigma_N - 1))


def validate_sigmas(sigmas: Sequence[float]) -> list[float]:
    """Custom sigma lists: non-empty, each in (0, 1], non-increasing (the terminal 0 is appended for you)."""
    values = [float(s) for s in sigmas]
    if not values:
        raise ValueError("sigmas is empty; pass a non-increasing list of noise levels in (0, 1]")
    bad = [s for s in values if not (0 < s <= 1) or math.isnan(s)]
    if bad:
        raise ValueError(f"sigmas must lie in (0, 1] (the terminal 0 is appended automatically); got {bad}")
    if any(b > a for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must be non-increasing, got {values}")
    return values


def euler_step(
    x: torch.Tensor, model_output: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor
) -> torch.Tensor:
    """One Euler step in float32 with the released sign convention (the model output is negated)."""
    return x.float() + (sigma_next - sigma) * (-model_output.float())
