"""Training sigmas (logit-normal, resolution shift, uniform mix), the WSM learning rate, and the velocity
target's sign checked against the samplers that consume it."""

import math

import pytest
import torch

from nucleus_image.diffusion import FlowSchedule, euler_step
from nucleus_image.training.config import TimestepConfig
from nucleus_image.training.loss import flow_loss, noisy_latents, router_z_loss, velocity_target
from nucleus_image.training.schedule import wsm_lr
from nucleus_image.training.timesteps import sample_sigmas, shift_mu


def test_shift_mu_is_the_released_line():
    cfg = TimestepConfig()
    assert shift_mu(256, cfg) == pytest.approx(0.5)
    assert shift_mu(4096, cfg) == pytest.approx(1.15)
    assert shift_mu(2176, cfg) == pytest.approx(0.825)  # halfway in tokens, halfway in mu: linear
    assert shift_mu(64, cfg) == pytest.approx(0.5 - 0.65 * 192 / 3840)  # extrapolated below 256 tokens
    assert shift_mu(1024, cfg) == pytest.approx(FlowSchedule().mu(1024))  # the sampler's own line


@pytest.mark.parametrize("seq_len", [256, 4096])
def test_logit_normal_with_shift(seq_len):
    cfg = TimestepConfig(uniform_share=0.0)
    s = sample_sigmas(200_000, seq_len, cfg, torch.Generator().manual_seed(0)).double()
    logit = torch.log(s / (1 - s))
    assert logit.mean().item() == pytest.approx(shift_mu(seq_len, cfg), abs=0.01)
    assert logit.std().item() == pytest.approx(1.0, abs=0.01)
    # Larger images train at more noise: the shift moves the mass up.
    assert (s > 0.5).double().mean().item() == pytest.approx(
        0.5 * (1 + math.erf(shift_mu(seq_len, cfg) / math.sqrt(2))), abs=0.005
    )


def test_uniform_share_mixes_in_uniform_sigmas():
    cfg = TimestepConfig(uniform_share=0.1, std=0.05, mu_min=0.0, mu_max=0.0)  # logit-normal: a spike at 0.5
    s = sample_sigmas(100_000, 256, cfg, torch.Generator().manual_seed(1))
    far = ((s - 0.5).abs() > 0.1).double().mean().item()  # only uniform draws land far from the spike
    assert far == pytest.approx(0.1 * 0.8, abs=0.005)
    s_all_uniform = sample_sigmas(100_000, 256, TimestepConfig(uniform_share=1.0), torch.Generator().manual_seed(2))
    assert torch.histc(s_all_uniform, bins=10, min=0, max=1).div(1e4).sub(1).abs().max() < 0.05
    assert torch.equal(
        sample_sigmas(8, 256, cfg, torch.Generator().manual_seed(3)),
        sample_sigmas(8, 256, cfg, torch.Generator().manual_seed(3)),
    )


def test_wsm_lr_warms_up_then_stays():
    lrs = [wsm_lr(step, 1e-3, 10) for step in range(30)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10]))
    assert lrs[10:] == [1e-3] * 20  # no decay: the merge provides it


def _oracle(x0):
    """The transformer a perfect model of a single data point would be: at (x_s, s) the noise is determined,
    and the output is the training target x0 - noise."""

    def predict(x_s, s):
        noise = (x_s - (1 - s) * x0) / s
        return velocity_target(x0, noise)

    return predict


def test_target_sign_lands_on_data_with_our_sampler():
    x0 = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(4))
    x = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(5))
    predict = _oracle(x0)
    sigmas = FlowSchedule(use_dynamic_shifting=True).sigmas(6, image_seq_len=16)
    for i in range(6):
        x = euler_step(x, predict(x, sigmas[i]), sigmas[i], sigmas[i + 1])
    assert torch.allclose(x, x0, atol=1e-5)
    flipped = torch.randn(2, 16, 12, generator=torch.Generator().manual_seed(5))
    for i in range(6):  # the opposite sign walks away from the data
        flipped = euler_step(flipped, -predict(flipped, sigmas[i]), sigmas[i], sigmas[i + 1])
    assert (flipped - x0).abs().mean() > 1.0


def test_target_sign_lands_on_data_with_the_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    x0 = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(6))
    x = torch.randn(1, 8, 4, generator=torch.Generator().manual_seed(7))
    predict = _oracle(x0)
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    for t in scheduler.timesteps:
        s = t / scheduler.config.num_train_timesteps
        noise_pred = -predict(x, s)  # exactly what the released pipeline does with the transformer output
        x = scheduler.step(noise_pred, t, x, return_dict=False)[0]
    assert torch.allclose(x, x0, atol=1e-5)


def test_losses():
    x0, noise = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    sigma = torch.tensor([0.0, 0.5, 1.0])
    x_s = noisy_latents(x0, noise, sigma)
    assert torch.equal(x_s[0], x0[0]) and torch.equal(x_s[2], noise[2])
    assert flow_loss(x0 - noise, x0, noise).item() == 0.0
    assert flow_loss(torch.zeros_like(x0), x0, noise).item() == pytest.approx((x0 - noise).pow(2).mean().item())
    logits = (torch.zeros(2, 3, 4), torch.full((1, 2, 4), 2.0))
    assert router_z_loss(logits).item() == pytest.approx((math.log(4) ** 2 + (2 + math.log(4)) ** 2) / 2, rel=1e-6)
