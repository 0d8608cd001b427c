"""Flow-matching schedules, the Euler sampler step and classifier-free guidance."""

from nucleus_image.diffusion.flow import FlowSchedule, euler_step, resolution_shift_mu, validate_sigmas
from nucleus_image.diffusion.guidance import combine, guided, uses_cfg
from nucleus_image.diffusion.sampler_settings import SamplerSettings

__all__ = [
    "FlowSchedule",
    "SamplerSettings",
    "combine",
    "euler_step",
    "guided",
    "resolution_shift_mu",
    "uses_cfg",
    "validate_sigmas",
]
