"""Distillation's distribution-matching term (DMD2): the three scores share one base and route without touching
`requires_grad`, the term vanishes where the fake score equals the real one and pushes the student's samples
towards the real score's denoising otherwise, the fake score learns, the shipped adapter is the student's alone,
a resumed run equals a straight one, and a student can start from a saved adapter."""

import json
import shutil

import pytest
import torch
from generation_fixtures import tiny_own_pipeline
from safetensors.torch import load_file
from test_distill import distill
from training_helpers import micro_dataset

from nucleus_image.adapters import add_lora
from nucleus_image.cli import main
from nucleus_image.distill.distribution_matching import (
    FAKE_ADAPTER,
    MatchingConfig,
    MatchingDraws,
    MatchingObjective,
    add_fake_score,
    draw,
    fake_score_optimizers,
    routed_through,
)
from nucleus_image.distill.objective import TrajectoryBatch, TrajectoryObjective, student_step, trajectory_loss
from nucleus_image.training.config import OptimizerConfig

MATCHING = ("--set", "matching.weight=1.0", "--set", "matching.fake_updates=2")


def _inputs(model, B=2, grid=4, L=5):
    """Random latents and text states for the tiny transformer at a grid x grid latent image."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, grid * grid, cfg.in_channels, generator=g)
    text = torch.randn(B, L, cfg.joint_attention_dim, generator=g)
    return x, text, [(1, grid, grid)] * B


@pytest.fixture
def adapted():
    """The tiny transformer with the student's adapter (perturbed away from zero) and the fake score's (zero)."""
    torch.manual_seed(0)
    transformer = tiny_own_pipeline().transformer
    base = {n: p.detach().clone() for n, p in transformer.named_parameters()}
    model = add_lora(transformer, rank=4)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    fake = add_fake_score(model, rank=4, alpha=None)
    return model, fake, base


def test_routing_selects_the_base_the_student_or_the_fake_score_and_keeps_requires_grad(adapted):
    model, fake, _ = adapted
    x, text, shapes = _inputs(model)
    t = torch.tensor(0.6)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.requires_grad for p in fake) and any(FAKE_ADAPTER in n for n in flags)
    with torch.no_grad():
        student = student_step(model, x, t, text, None, shapes)
        with routed_through(model, None):
            base = student_step(model, x, t, text, None, shapes)
        with routed_through(model, FAKE_ADAPTER):
            fake_out = student_step(model, x, t, text, None, shapes)
        with model.disable_adapter():
            peft_base = student_step(model, x, t, text, None, shapes)
        again = student_step(model, x, t, text, None, shapes)
    for n, q in model.named_parameters():
        q.requires_grad_(flags[n])  # peft's disable_adapter flips them: restore before the comparison below
    with torch.no_grad():
        for p in fake:
            p.add_(0.1)
        with routed_through(model, FAKE_ADAPTER):
            moved = student_step(model, x, t, text, None, shapes)
    assert torch.equal(base, peft_base)  # the base alone, as peft's own switch gives it
    assert torch.equal(fake_out, base)  # the fake score starts as the base
    assert not torch.allclose(student, base, atol=1e-4)  # the student's adapter is not the base
    assert torch.equal(again, student)  # the student's routing is restored
    assert not torch.allclose(moved, base, atol=1e-4)  # the fake adapter is what the fake routing runs


def _objective(model, fake, guidance, weight=1.0):
    sigma = torch.tensor([1.0, 0.5, 0.0])
    trajectory = TrajectoryObjective(sigma, sigma[:-1])
    fake_cfg = OptimizerConfig(lr=1e-3, warmup_steps=0)
    optimizers = fake_score_optimizers(model, fake, fake_cfg, torch.float32)
    return MatchingObjective(trajectory, MatchingConfig(weight=weight), guidance, fake, optimizers, fake_cfg)


def _batch(model):
    matching_cfg = MatchingConfig(weight=1.0)
    x, text, shapes = _inputs(model)
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(x.shape[0], 3, *x.shape[1:], generator=g)
    drawn = draw(2, matching_cfg, x.shape[0], 2, tuple(x.shape[1:]), "cpu")
    empty = torch.zeros_like(text)
    d = MatchingDraws(**drawn, guided_text_RLD=torch.cat([text, empty]), guided_mask_RL=None, step=0)
    return TrajectoryBatch(teacher, text, None, shapes, d)


def test_the_term_vanishes_where_the_fake_score_equals_the_real_one(adapted):
    """Guidance 1 and a fake score at its zero start: both scores are the unguided base, so the loss is the
    trajectory loss alone and the term adds no gradient, however far the student's adapter is from zero (a
    real score that ran the student's adapter would not vanish)."""
    model, fake, _ = adapted
    objective = _objective(model, fake, guidance=1.0)
    batch = _batch(model)
    fake_before = [p.detach().clone() for p in fake]
    loss, logged = objective(model, batch)
    traj = objective.trajectory
    plain, _ = trajectory_loss(
        model, batch.teacher_BKSC, traj.sigma_K1, traj.t_K, batch.text_BLD, None, batch.img_shapes
    )
    assert float(logged["matching_grad"]) == 0.0
    assert torch.allclose(loss, plain, rtol=1e-6, atol=0)
    assert all(p.grad is None for p in fake)  # the fake score's own step leaves nothing for the student's
    assert any(not torch.equal(p, q) for p, q in zip(fake, fake_before))  # ... and it took that step
    assert float(logged["fake_loss"]) > 0


def test_the_term_pulls_the_samples_towards_the_guided_teacher(adapted):
    """With guidance 4 the real score (guided) differs from the fake one (unguided), and the term's gradient on a
    sample x0 is (x0_fake - x0_real) / mean |x0 - x0_real| per element of the mean: descending it moves x0 towards
    the real score's denoising and away from the fake score's."""
    model, fake, _ = adapted
    objective = _objective(model, fake, guidance=4.0)
    batch = _batch(model)
    d = batch.matching
    x0 = torch.randn(2, 16, model.config.in_channels, generator=torch.Generator().manual_seed(3))
    t = d.t_B.view(-1, 1, 1)
    x_t = (1 - t) * x0 + t * d.noise_BSC
    with torch.no_grad(), routed_through(model, None):
        x0_real = x_t + t * objective._real_score(model, x_t, d, batch)
    with torch.no_grad(), routed_through(model, FAKE_ADAPTER):
        x0_fake = x_t + t * student_step(model, x_t, d.t_B, batch.text_BLD, None, batch.img_shapes)
    grad = (x0_fake - x0_real) / (x0 - x0_real).abs().mean(dim=(1, 2), keepdim=True)
    assert float(grad.abs().mean()) > 1e-3  # guidance makes the real score differ from the unguided fake one
    sample = x0.clone().requires_grad_(True)
    (0.5 * ((sample - (x0 - grad)) ** 2).mean()).backward()
    assert torch.allclose(sample.grad * sample.numel(), grad, atol=1e-6)
    # The objective's own term on its samples: the same gradient's size, logged.
    loss, logged = objective(model, batch)
    assert torch.isfinite(loss) and float(logged["matching_grad"]) > 1e-3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A plain and a distribution-matching tiny distillation on the same teacher trajectories."""
    root = tmp_path_factory.mktemp("matching")
    tiny_own_pipeline().save_pretrained(root / "model")
    data = micro_dataset(root / "data")
    assert distill(root / "model", data, root / "plain", "--threads", "1") == 0
    shutil.copytree(root / "plain" / "teacher", root / "matching" / "teacher")
    shutil.copytree(root / "plain" / "teacher-validation", root / "matching" / "teacher-validation")
    assert distill(root / "model", data, root / "matching", "--threads", "1", *MATCHING) == 0
    return root


def test_a_matching_run_ships_the_students_adapter_and_checkpoints_the_fake_score(runs):
    plain = load_file(runs / "plain" / "adapter" / "adapter_model.safetensors")
    matched = load_file(runs / "matching" / "adapter" / "adapter_model.safetensors")
    assert plain.keys() == matched.keys()  # the student's adapter alone, under the same names
    assert not (runs / "matching" / "adapter" / FAKE_ADAPTER).exists()
    assert any(not torch.equal(plain[k], matched[k]) for k in plain)  # the term changed the student
    config = json.loads((runs / "matching" / "distill_config.json").read_text())
    assert config["matching"]["weight"] == 1.0 and config["matching"]["fake_updates"] == 2
    last = sorted((runs / "matching" / "checkpoints").glob("step-*"))[-1]
    files = {p.name for p in last.iterdir()}
    weights = load_file(next(last / f for f in files if f.endswith(".safetensors") and "model" in f))
    fake_b = [v for k, v in weights.items() if f"{FAKE_ADAPTER}" in k and "lora_B" in k]
    assert fake_b and any(v.abs().sum() > 0 for v in fake_b)  # the fake score trained from its zero start


def test_a_resumed_matching_run_equals_a_straight_one(runs, tmp_path):
    model, data = runs / "model", runs / "data"
    split = tmp_path / "split"
    for store in ("teacher", "teacher-validation"):
        shutil.copytree(runs / "plain" / store, split / store)
    assert distill(model, data, split, "--threads", "1", "--max-steps", "8", *MATCHING) == 0
    assert main(["distill", "--out", str(split), "--resume", "--no-progress"]) == 0
    straight = load_file(runs / "matching" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(split / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert json.loads((split / "losses.json").read_text()) == json.loads(
        (runs / "matching" / "losses.json").read_text()
    )


def test_bad_matching_settings_are_refused_by_name(runs, capsys):
    for setting, message in (
        ("matching.weight=-1", "matching.weight=-1"),
        ("matching.fake_updates=0", "matching.fake_updates=0"),
        ("matching.t_max=1.0", "t_min <= t_max < 1"),
    ):
        assert distill(runs / "model", runs / "data", runs / "bad", "--set", setting) == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("rollout", ["student", "teacher"])
def test_each_steps_x0_prediction_is_its_input_plus_sigma_times_the_output(adapted, rollout):
    """The samples the term trains on: x + s_i * u(x, s_i) at each step's input, which is the teacher's state in the
    teacher rollout and the student's own previous state in its own (both start from the teacher's noise)."""
    model, _, _ = adapted
    batch = _batch(model)
    sigma = torch.tensor([1.0, 0.5, 0.0])
    with torch.no_grad():
        loss, per_step, x0 = trajectory_loss(
            model, batch.teacher_BKSC, sigma, sigma[:-1], batch.text_BLD, None, batch.img_shapes, rollout, True
        )
        first = batch.teacher_BKSC[:, 0]
        u0 = student_step(model, first, sigma[0], batch.text_BLD, None, batch.img_shapes)
        euler = first + (0.5 - 1.0) * -u0  # the student's own step from 1 to 0.5
        second = batch.teacher_BKSC[:, 1] if rollout == "teacher" else euler
        u1 = student_step(model, second, sigma[1], batch.text_BLD, None, batch.img_shapes)
    assert x0.shape == (2, *first.shape)
    assert torch.allclose(x0[0], first + u0, atol=1e-5)
    assert torch.allclose(x0[1], second + 0.5 * u1, atol=1e-5)
    assert torch.allclose(loss, per_step.mean())


def test_a_student_starts_from_a_saved_adapter(runs, tmp_path, capsys):
    """`--init-adapter`: the run's first validation (before any update) scores the saved student exactly as that
    student's own run scored it last; another rank or a folder that is no adapter is refused before any work."""
    model, data = runs / "model", runs / "data"
    out = tmp_path / "from-plain"
    for store in ("teacher", "teacher-validation"):
        shutil.copytree(runs / "plain" / store, out / store)
    adapter = str(runs / "plain" / "adapter")
    assert distill(model, data, out, "--init-adapter", adapter, "--max-steps", "1", *MATCHING) == 0
    first = json.loads((out / "validation.json").read_text())[0]
    last = json.loads((runs / "plain" / "validation.json").read_text())[-1]
    assert first["step"] == 0 and last["step"] == 16
    assert first["loss"] == pytest.approx(last["loss"], rel=1e-6)
    capsys.readouterr()
    assert distill(model, data, tmp_path / "rank", "--init-adapter", adapter, "--lora-rank", "4") == 2
    assert "has rank 8, lora_rank is 4" in capsys.readouterr().err
    assert distill(model, data, tmp_path / "none", "--init-adapter", str(tmp_path)) == 2
    assert "is not a LoRA adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "rank").exists() and not (tmp_path / "none").exists()
