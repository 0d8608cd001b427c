"""The baseline arms beside the recipe (Muon + AdamW under Warmup-Stable-Merge, then a checkpoint merge):

- `optimizer.kind=adamw`: AdamW on every parameter, which trains (the loss falls on a fixed batch) and skips a
  non-finite step on the device like the recipe (no weight, moment or step count changes);
- `optimizer.schedule=cosine`: warmup, then a half cosine from lr to `min_lr_ratio * lr` at the run's last step,
  following the total when the time guard re-plans it;
- `ema_decay`: the moving average of the weights, its update formula, left alone by a skipped step, saved in each
  checkpoint and resumed exactly (an interrupted run ends bit for bit as the straight one), exported by
  `nucleus merge --ema`, with no host read in the training step.

The defaults leave the recipe as it was: tests/test_golden_loss.py and tests/test_resume.py cover that.
"""

import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import fixed_batch, micro_config, micro_dataset

from nucleus_image.cli import main
from nucleus_image.training.checkpoint import EMA_FILE, list_checkpoints
from nucleus_image.training.config import OptimizerConfig, TrainConfig
from nucleus_image.training.ema import WeightEMA
from nucleus_image.training.optim import build_optimizers, describe_groups
from nucleus_image.training.schedule import cosine_lr, lr_at, wsm_lr
from nucleus_image.training.step import train_step
from nucleus_image.training.trainer import Trainer

sys.path.insert(0, str(Path(__file__).parent / "process_hooks"))
import host_sync  # noqa: E402

torch.set_num_threads(1)


def poisoned(objective):
    def loss_fn(model, batch):
        loss, logged = objective(model, batch)
        return loss * float("nan"), logged

    return loss_fn


def optimizer_state(opt) -> dict[str, torch.Tensor]:
    return {f"{j}.{k}": v.clone() for j, st in enumerate(opt.state.values()) for k, v in st.items()}


# ---- AdamW alone ------------------------------------------------------------------------------------------------
def test_adamw_only_takes_every_parameter_trains_and_skips_a_non_finite_step():
    model, batch, objective = fixed_batch()
    cfg = OptimizerConfig(kind="adamw", lr=3e-3, warmup_steps=2, weight_decay=0.1)
    muon, adamw, groups = build_optimizers(model, cfg, torch.float32)
    assert muon is None and groups["muon"] == []
    trained = {id(p) for g in adamw.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(p.dim() >= 2 for p in adamw.param_groups[0]["params"]) and adamw.param_groups[0]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in adamw.param_groups[1]["params"]) and adamw.param_groups[1]["weight_decay"] == 0.0
    assert "adamw  total" in describe_groups(groups) and "muon" not in describe_groups(groups)

    losses = [float(train_step(model, [adamw], [batch], objective, cfg, step).loss) for step in range(12)]
    assert np.isfinite(losses).all() and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses

    weights, state = {k: v.clone() for k, v in model.state_dict().items()}, optimizer_state(adamw)
    skipped = train_step(model, [adamw], [batch], poisoned(objective), cfg, 12)
    assert not bool(skipped.applied)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    after = optimizer_state(adamw)
    assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)  # step counts too
    again = train_step(model, [adamw], [batch], objective, cfg, 12)
    assert bool(again.applied) and float(again.loss) < losses[0]


# ---- the cosine schedule -----------------------------------------------------------------------------------------
def test_cosine_lr_at_warmup_end_midpoint_and_last_step():
    peak, warmup, total, r = 2e-3, 10, 111, 0.1
    cfg = OptimizerConfig(lr=peak, warmup_steps=warmup, schedule="cosine", min_lr_ratio=r)
    # Warmup exactly as the recipe's.
    assert [lr_at(cfg, s, total) for s in range(warmup)] == [wsm_lr(s, peak, warmup) for s in range(warmup)]
    assert lr_at(cfg, warmup - 1, total) == peak and lr_at(cfg, warmup, total) == peak
    mid = warmup + (total - 1 - warmup) // 2  # t = 1/2: halfway between peak and floor
    assert lr_at(cfg, mid, total) == pytest.approx(peak * (r + (1 - r) / 2), rel=1e-12)
    quarter = warmup + (total - 1 - warmup) // 4
    assert lr_at(cfg, quarter, total) == pytest.approx(peak * (r + (1 - r) * (1 + math.cos(math.pi / 4)) / 2))
    assert lr_at(cfg, total - 1, total) == pytest.approx(r * peak, rel=1e-12)
    assert lr_at(cfg, total + 5, total) == pytest.approx(r * peak, rel=1e-12)  # past the end: the floor
    lrs = [lr_at(cfg, s, total) for s in range(warmup, total)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # A re-planned total: the same step reads the new plan, and its last step ends at the floor.
    replanned = 61
    assert lr_at(cfg, 35, replanned) == pytest.approx(
        peak * (r + (1 - r) * (1 + math.cos(math.pi * (35 - warmup) / (replanned - 1 - warmup))) / 2)
    )
    assert lr_at(cfg, replanned - 1, replanned) == pytest.approx(r * peak, rel=1e-12)
    # WSM ignores the total; a cosine without one is refused.
    assert lr_at(OptimizerConfig(lr=peak, warmup_steps=warmup), 500, None) == peak
    with pytest.raises(ValueError, match="total step count"):
        lr_at(cfg, 20, None)
    assert cosine_lr(0, peak, 0, 1, r) == pytest.approx(r * peak)  # a one-step run is its own last step


def test_schedule_options_are_validated_by_name():
    cfg = TrainConfig.preset("tiny").override(["optimizer.schedule=cosine", "optimizer.min_lr_ratio=0"])
    assert cfg.optimizer.schedule == "cosine" and cfg.optimizer.min_lr_ratio == 0.0
    for assignment, message in (
        ("optimizer.schedule=linear", r"optimizer.schedule 'linear'; accepted: wsm, cosine"),
        ("optimizer.min_lr_ratio=1.5", r"optimizer.min_lr_ratio must be in \[0, 1\], got 1.5"),
        ("optimizer.kind=sgd", r"optimizer.kind 'sgd'; accepted: muon, adamw"),
        ("ema_decay=1", r"ema_decay must be in \[0, 1\) \(0 = no EMA\), got 1.0"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig.preset("tiny").override([assignment])


def test_the_trainer_decays_over_the_replanned_total(tmp_path, monkeypatch):
    """The trainer hands each step its current total: a re-plan (what the time guard does to `total_steps`)
    moves the rest of the cosine, and the run's last step trains at the floor."""
    seen = []

    class Recording(Trainer):
        def _train_step(self, stage):
            out = super()._train_step(stage)
            seen.append((self.step - 1, self.total_steps, self.adamw.param_groups[0]["lr"]))
            if self.step == 4:
                self.total_steps = 7  # re-planned from 10 to 7 steps
            return out

    cfg = micro_config(**{"optimizer.schedule": "cosine", "optimizer.warmup_steps": 2, "checkpoint_every": 100})
    data = micro_dataset(tmp_path / "data")
    threads = torch.get_num_threads()
    try:
        Recording(cfg, data, tmp_path / "run", max_steps=10, progress=False).train()
    finally:
        torch.set_num_threads(threads)
    o = cfg.optimizer
    assert [(s, t) for s, t, _ in seen] == [(s, 10) for s in range(4)] + [(s, 7) for s in range(4, 7)]
    for step, total, lr in seen:
        assert lr == cosine_lr(step, o.lr, o.warmup_steps, total, o.min_lr_ratio)
    assert seen[-1][2] == pytest.approx(o.min_lr_ratio * o.lr)


# ---- the EMA of the weights ---------------------------------------------------------------------------------------
def test_ema_update_formula_and_a_skipped_step_leaves_it_alone():
    model, batch, objective = fixed_batch()
    cfg = OptimizerConfig(kind="adamw", lr=3e-3, warmup_steps=0)
    _, adamw, _ = build_optimizers(model, cfg, torch.float32)
    ema = WeightEMA(model, 0.9)
    n = sum(p.numel() for p in model.parameters())
    assert ema.numel == n and ema.nbytes == 4 * n
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    assert all(torch.equal(start[k], v) for k, v in model.state_dict().items())  # starts at the weights

    for step in range(3):
        before = {k: v.clone() for k, v in ema.state_dict().items()}
        out = train_step(model, [adamw], [batch], objective, cfg, step)
        ema.update(out.applied)
        weights = model.state_dict()
        for k, v in ema.state_dict().items():
            expected = 0.9 * before[k].double() + 0.1 * weights[k].double()
            torch.testing.assert_close(v.double(), expected, rtol=2e-7, atol=1e-8)  # float32 rounding
    assert any(not torch.equal(start[k], v) for k, v in ema.state_dict().items())

    before = {k: v.clone() for k, v in ema.state_dict().items()}
    out = train_step(model, [adamw], [batch], poisoned(objective), cfg, 3)
    ema.update(out.applied)
    assert not bool(out.applied) and all(torch.equal(before[k], v) for k, v in ema.state_dict().items())

    with pytest.raises(ValueError, match="missing"):
        ema.load_state_dict({})


class StopsAt(Trainer):
    """A run interrupted (as by Ctrl-C) after step `stop`: it saves there and returns."""

    stop = 7

    def _train_step(self, stage):
        out = super()._train_step(stage)
        if self.step == self.stop:
            self.stop_requested = True
        return out


def test_ema_resumes_exactly_and_merge_exports_it(tmp_path, capsys):
    steps = 10
    cfg = micro_config(ema_decay=0.8, checkpoint_every=5, **{"optimizer.kind": "adamw", "optimizer.schedule": "cosine"})
    data = micro_dataset(tmp_path / "data")
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(cfg, data, straight, max_steps=steps, progress=False)
        trainer.train()
        StopsAt(cfg, data, interrupted, max_steps=steps, progress=False).train()
        assert [s for s, _ in list_checkpoints(interrupted)] == [5, 7]
        resumed = Trainer(cfg, data, interrupted, max_steps=steps, resume=True, progress=False)
        assert resumed.step == 7
        torch.testing.assert_close(  # the average came back, not a fresh copy of the weights
            resumed.state.ema.state_dict(), load_file(list_checkpoints(interrupted)[-1][1] / EMA_FILE)
        )
        resumed.train()
    finally:
        torch.set_num_threads(threads)
    n = sum(p.numel() for p in trainer.model.parameters())
    assert f"{4 * n:,} bytes" in capsys.readouterr().out
    assert '"ema_bytes": ' + str(4 * n) in (straight / "timing.json").read_text()

    final = {run: list_checkpoints(run)[-1][1] for run in (straight, interrupted)}
    assert final[straight].name == final[interrupted].name == f"step-{steps:08d}"
    assert (straight / "losses.json").read_text() == (interrupted / "losses.json").read_text()
    for name in ("model.safetensors", "optimizer.safetensors", EMA_FILE):
        a, b = load_file(final[straight] / name), load_file(final[interrupted] / name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    ema, weights = load_file(final[straight] / EMA_FILE), load_file(final[straight] / "model.safetensors")
    assert set(ema) == set(weights) and all(v.dtype == torch.float32 for v in ema.values())
    assert any(not torch.equal(ema[k], weights[k]) for k in ema)

    from nucleus_image.pipeline import NucleusPipeline

    assert main(["merge", str(straight), "--ema", "--out", str(tmp_path / "ema")]) == 0
    got = NucleusPipeline.from_pretrained(tmp_path / "ema", device="cpu").transformer.state_dict()
    assert set(got) == set(ema) and all(torch.equal(got[k], ema[k].to(got[k].dtype)) for k in ema)
    assert '"ema": true' in (tmp_path / "ema" / "merge.json").read_text()
    assert main(["merge", str(straight), "--ema", "--last", "2", "--out", str(tmp_path / "x")]) == 2
    no_ema = tmp_path / "no_ema"
    shutil.copytree(straight, no_ema)
    (list_checkpoints(no_ema)[-1][1] / EMA_FILE).unlink()
    assert main(["merge", str(no_ema), "--ema", "--out", str(tmp_path / "x")]) == 2
    assert "has no ema.safetensors" in capsys.readouterr().err


def test_ema_and_cosine_read_nothing_back_in_the_training_step(tmp_path, monkeypatch):
    import nucleus_image.training.loss as loss_module

    host_sync.install(monkeypatch.setattr)
    host_sync.BLOCKED.clear()
    real_loss, calls = loss_module.flow_loss, {"n": 0}

    def poisoned_at_4(pred, x0, noise):
        calls["n"] += 1
        loss = real_loss(pred, x0, noise)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(loss_module, "flow_loss", poisoned_at_4)
    cfg = micro_config(
        data_workers=0, log_every=3, checkpoint_every=6, ema_decay=0.9, **{"optimizer.schedule": "cosine"}
    )
    threads = torch.get_num_threads()
    try:
        result = Trainer(cfg, micro_dataset(tmp_path / "data"), tmp_path / "run", max_steps=6, progress=False).train()
    finally:
        torch.set_num_threads(threads)
    assert host_sync.BLOCKED == [] and result.nonfinite_skipped == 1
