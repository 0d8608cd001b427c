"""The sampler settings a model or adapter is meant to be sampled with: step count, noise levels and guidance.

A few-step student (`nucleus distill`) is only good at the steps it was distilled for and without guidance, so
its adapter carries these settings and `NucleusPipeline.load_lora` makes them the pipeline's defaults. Arguments a
caller passes still win: `resolve` fills in only what the call leaves out.

    SamplerSettings(num_inference_steps=4, sigmas=(1.0, 0.75, 0.5, 0.25), guidance_scale=1.0).resolve(None, 8, None)
    # -> (1.0, 8, None): 8 steps asked for, so the adapter's 4 noise levels give way to the default 8
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

from nucleus_image.diffusion.flow import validate_sigmas

# The released pipeline's defaults (diffusers' NucleusMoEImagePipeline): 50 steps, guidance 4, linear sigmas.
RELEASED_STEPS = 50
RELEASED_GUIDANCE = 4.0


@dataclass(frozen=True)
class SamplerSettings:
    """`sigmas` are the noise levels before the schedule's shift, as `pipe(sigmas=...)` takes them (None: the
    schedule's default linspace for the step count); when given, their number is the step count."""

    num_inference_steps: int = RELEASED_STEPS
    guidance_scale: float = RELEASED_GUIDANCE
    sigmas: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"sampler settings: num_inference_steps must be a positive integer, got {steps!r}")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, Real) or not math.isfinite(g):
            raise ValueError(f"sampler settings: guidance_scale must be a finite number, got {g!r}")
        if self.sigmas is not None:
            sigmas = tuple(validate_sigmas(self.sigmas))
            if len(sigmas) != steps:
                raise ValueError(
                    f"sampler settings: {len(sigmas)} sigmas {list(sigmas)} for num_inference_steps="
                    f"{steps}; give one noise level per step"
                )
            object.__setattr__(self, "sigmas", sigmas)

    def resolve(
        self, guidance_scale: float | None, num_inference_steps: int | None, sigmas: Sequence[float] | None
    ) -> tuple[float, int, list[float] | None]:
        """(guidance, steps, sigmas) for a call: what the call gives, else these settings. The settings' sigmas
        apply only when the call names no sigmas and either no step count or their step count."""
        guidance = self.guidance_scale if guidance_scale is None else guidance_scale
        if sigmas is not None:
            return guidance, len(sigmas) if num_inference_steps is None else num_inference_steps, list(sigmas)
        steps = self.num_inference_steps if num_inference_steps is None else num_inference_steps
        mine = self.sigmas is not None and steps == self.num_inference_steps
        return guidance, steps, list(self.sigmas) if mine else None

    def to_dict(self) -> dict:
        return {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": float(self.guidance_scale),
            "sigmas": None if self.sigmas is None else [float(s) for s in self.sigmas],
        }

    @classmethod
    def from_dict(cls, data: dict) -> SamplerSettings:
        known = {"num_inference_steps", "guidance_scale", "sigmas"}
        if not isinstance(data, dict) or set(data) - known:
            extra = sorted(set(data) - known) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"sampler settings: unknown fields {extra}; accepted: {sorted(known)}")
        sigmas = data.get("sigmas")
        return cls(
            num_inference_steps=data.get("num_inference_steps", RELEASED_STEPS),
            guidance_scale=data.get("guidance_scale", RELEASED_GUIDANCE),
            sigmas=None if sigmas is None else tuple(sigmas),
        )
