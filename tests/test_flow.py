"""Flow-matching schedules, the Euler step and CFG against diffusers' FlowMatchEulerDiscreteScheduler and the
released pipeline's formulas."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from nucleus_image.diffusion import (
    FlowSchedule,
    combine,
    euler_step,
    guided,
    resolution_shift_mu,
    uses_cfg,
    validate_sigmas,
)

SCHEDULER_CONFIGS = [
    {},  # the released scheduler: unshifted
    {"shift": 3.0},
    {"use_dynamic_shifting": True},
    {"use_dynamic_shifting": True, "time_shift_type": "linear", "base_shift": 0.3, "max_shift": 1.5},
    {"shift": 2.0, "shift_terminal": 0.05},
]


@pytest.mark.parametrize(
    "config", SCHEDULER_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "released"
)
@pytest.mark.parametrize("steps", [2, 7, 50])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_sigmas_match_diffusers_bitwise(config, steps, seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    ours = FlowSchedule.from_config(dict(scheduler.config))
    # What the released pipeline does: its own linspace and mu, handed to the scheduler.
    mu = resolution_shift_mu(
        seq_len,
        scheduler.config.base_image_seq_len,
        scheduler.config.max_image_seq_len,
        scheduler.config.base_shift,
        scheduler.config.max_shift,
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sigmas = ours.sigmas(steps, image_seq_len=seq_len)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (steps + 1,)
    assert torch.equal(sigmas, scheduler.sigmas)
    assert sigmas[-1] == 0


def test_released_schedule_values():
    sigmas = FlowSchedule().sigmas(4)
    assert sigmas.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0], abs=1e-7)


def test_resolution_shift_mu_endpoints_and_shift_direction():
    assert resolution_shift_mu(256) == pytest.approx(0.5)
    assert resolution_shift_mu(4096) == pytest.approx(1.15)
    assert resolution_shift_mu(2176) == pytest.approx(0.825)
    dynamic = FlowSchedule(use_dynamic_shifting=True)
    # More image tokens -> larger mu -> more of the schedule spent at high noise.
    assert (dynamic.sigmas(10, 4096)[1:-1] > dynamic.sigmas(10, 256)[1:-1]).all()
    with pytest.raises(ValueError, match="image sequence length"):
        dynamic.sigmas(10)


def test_custom_sigmas_are_shifted_and_terminated_like_diffusers():
    custom = [1.0, 0.8, 0.4, 0.1]
    scheduler = FlowMatchEulerDiscreteScheduler(shift=2.5)
    scheduler.set_timesteps(sigmas=custom)
    assert torch.equal(FlowSchedule(shift=2.5).sigmas(sigmas=custom), scheduler.sigmas)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([], "empty"),
        ([1.0, 0.0], r"\(0, 1\]"),
        ([1.2, 0.5], r"\(0, 1\]"),
        ([0.5, 0.7], "non-increasing"),
        ([float("nan")], r"\(0, 1\]"),
    ],
)
def test_bad_custom_sigmas_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        validate_sigmas(bad)


@pytest.mark.parametrize(
    "config, match",
    [
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"time_shift_type": "cubic"}, "cubic"),
        ({"shift": 0.0}, "shift must be > 0"),
    ],
)
def test_unsupported_scheduler_configs_are_refused(config, match):
    with pytest.raises(ValueError, match=match):
        FlowSchedule.from_config(config)


def test_shift_terminal_refuses_single_step():
    with pytest.raises(ValueError, match="last sigma below 1"):
        FlowSchedule(shift_terminal=0.1).sigmas(1)


def test_config_round_trip_through_diffusers():
    ours = FlowSchedule(shift=1.7, use_dynamic_shifting=True, base_shift=0.4)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(ours.to_config())
    assert FlowSchedule.from_config(dict(scheduler.config)) == ours


def test_euler_step_matches_scheduler_step_with_released_sign():
    g = torch.Generator().manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5))
    sigmas = FlowSchedule().sigmas(5)
    x_ref = x_ours = torch.randn(2, 16, 8, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        pred = torch.randn(2, 16, 8, generator=g)
        x_ref = scheduler.step(-pred, t, x_ref, return_dict=False)[0]
        x_ours = euler_step(x_ours, pred, sigmas[i], sigmas[i + 1])
        assert torch.equal(x_ours, x_ref)


def test_euler_step_integrates_a_straight_flow_exactly():
    # For x_sigma = (1 - sigma) x0 + sigma noise, the released model output is x0 - noise (negated velocity).
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    sigmas = FlowSchedule(shift=3.0).sigmas(7)
    x = noise.clone()
    for i in range(7):
        x = euler_step(x, x0 - noise, sigmas[i], sigmas[i + 1])
    torch.testing.assert_close(x, x0, atol=1e-6, rtol=0)


def test_cfg_combination_matches_released_formula_and_keeps_cond_norm():
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(3, 10, 8, generator=g), torch.randn(3, 10, 8, generator=g)
    comb = uncond + 4.0 * (cond - uncond)
    expected = comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    assert torch.equal(combine(cond, uncond, 4.0), expected)
    torch.testing.assert_close(combine(cond, uncond, 4.0).norm(dim=-1), cond.norm(dim=-1))
    # Batched rows: conditional first, unconditional second.
    assert torch.equal(guided(torch.cat([cond, uncond]), 4.0), expected)


def test_cfg_zero_prediction_stays_finite():
    """A zero-initialised model predicts exactly zero; the reference's rescale gives 0/0 = NaN there."""
    zero = torch.zeros(2, 5, 4)
    other = torch.randn(2, 5, 4)
    assert torch.equal(combine(zero, zero, 4.0), zero)
    assert torch.isfinite(combine(zero, other, 4.0)).all()


@pytest.mark.parametrize("scale", [0.0, 1.0])
def test_guidance_at_most_one_uses_the_conditional_rows_only(scale):
    pred = torch.randn(2, 5, 4)
    assert not uses_cfg(scale)
    assert guided(pred, scale) is pred
