"""The one training step (`training.step.train_step`) and what the trainer builds around it:

- a step whose gradient is not finite changes no weight and no optimizer state (Muon's momentum, AdamW's
  moments and step count), decided on the device, and the next step trains on;
- micro-batches accumulate to the full batch's step;
- each row's noise and sigma depend only on (seed, step, row), so any split of rows over processes draws the
  numbers one process would;
- a training run reads no tensor back to the host outside its logging steps, checkpoints and sample grids
  (`Tensor.item`, `tolist`, `__float__`, `__int__`, `__bool__`, `cpu`, `numpy` patched to raise: on a GPU each
  would wait for every queued kernel), a skipped non-finite step included, and still logs on its logging steps."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training_helpers import fixed_batch, micro_config, micro_dataset

from nucleus_image.training.config import OptimizerConfig, TimestepConfig
from nucleus_image.training.loss import FlowBatch
from nucleus_image.training.noise import row_noise
from nucleus_image.training.optim import build_optimizers
from nucleus_image.training.step import train_step

sys.path.insert(0, str(Path(__file__).parent / "process_hooks"))
import host_sync  # noqa: E402

torch.set_num_threads(1)


def model_and_batches(micro: int = 1, seed: int = 0):
    model, batch, objective = fixed_batch(seed)
    B = batch.x0_BSC.shape[0]
    n = B // micro
    parts = [
        FlowBatch(
            *(t[i * n : (i + 1) * n] for t in (batch.x0_BSC, batch.noise_BSC, batch.sigma_B, batch.text_BLD)),
            None,
            batch.grid,
        )
        for i in range(micro)
    ]
    return model, parts, objective


def optimizer_state(optimizers) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{j}.{k}": v.clone()
        for i, opt in enumerate(optimizers)
        for j, st in enumerate(opt.state.values())
        for k, v in st.items()
        if torch.is_tensor(v)
    }


def test_a_non_finite_step_changes_nothing_and_training_goes_on():
    model, batches, objective = model_and_batches()
    opt_cfg = OptimizerConfig(lr=1e-2, warmup_steps=0, weight_decay=0.1)
    optimizers = [o for o in build_optimizers(model, opt_cfg, torch.float32)[:2] if o is not None]
    first = train_step(model, optimizers, batches, objective, opt_cfg, 0)
    assert bool(first.applied) and torch.isfinite(first.loss) and first.grad_norm > 0
    weights, state = {k: v.clone() for k, v in model.state_dict().items()}, optimizer_state(optimizers)
    assert any("momentum_buffer" in k for k in state) and any("exp_avg_sq" in k for k in state)

    def poisoned(model, batch):
        loss, logged = objective(model, batch)
        return loss * float("nan"), logged

    skipped = train_step(model, optimizers, batches, poisoned, opt_cfg, 1)
    assert not bool(skipped.applied) and torch.isnan(skipped.loss) and not torch.isfinite(skipped.grad_norm)
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    after = optimizer_state(optimizers)
    assert after.keys() == state.keys() and all(torch.equal(state[k], after[k]) for k in state)  # steps too

    again = train_step(model, optimizers, batches, objective, opt_cfg, 1)
    assert bool(again.applied) and any(not torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_micro_batches_accumulate_to_the_full_batch_step():
    opt_cfg = OptimizerConfig(lr=1e-2, warmup_steps=0)
    results = []
    for micro in (1, 2):
        model, batches, objective = model_and_batches(micro)
        optimizers = [o for o in build_optimizers(model, opt_cfg, torch.float32)[:2] if o is not None]
        out = train_step(model, optimizers, batches, objective, opt_cfg, 0)
        results.append((out, model.state_dict()))
    (one, a), (two, b) = results
    torch.testing.assert_close(two.loss, one.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(two.grad_norm, one.grad_norm, rtol=1e-5, atol=0)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)  # updates are lr = 1e-2


def test_row_noise_is_a_function_of_seed_step_and_row():
    cfg = TimestepConfig()
    whole, sigma = row_noise(3, 7, np.arange(6), (10, 4), cfg, torch.device("cpu"))
    # Rows split over three processes (and in the per-micro-batch order a rank takes them) give the same numbers.
    parts = [row_noise(3, 7, rows, (10, 4), cfg, torch.device("cpu")) for rows in ([0, 1], [2, 3], [4, 5])]
    assert torch.equal(torch.cat([n for n, _ in parts]), whole) and torch.equal(torch.cat([s for _, s in parts]), sigma)
    other_step, _ = row_noise(3, 8, np.arange(6), (10, 4), cfg, torch.device("cpu"))
    other_seed, _ = row_noise(4, 7, np.arange(6), (10, 4), cfg, torch.device("cpu"))
    assert not torch.equal(other_step, whole) and not torch.equal(other_seed, whole)
    assert sigma.shape == (6,) and bool(((sigma > 0) & (sigma < 1)).all())
    assert abs(float(whole.std()) - 1.0) < 0.2


def test_training_reads_nothing_back_outside_logging_steps(tmp_path, monkeypatch):
    import nucleus_image.training.loss as loss_module
    from nucleus_image.training.trainer import Trainer

    host_sync.install(monkeypatch.setattr)
    with pytest.raises(host_sync.HostSyncError):  # the guard is live inside a run
        host_sync._window("training", lambda: torch.ones(1).item())()
    host_sync.BLOCKED.clear()
    real_loss, calls = loss_module.flow_loss, {"n": 0}

    def poisoned(pred, x0, noise):  # step 6 (0-based 5) is not finite: skipped on the device
        calls["n"] += 1
        loss = real_loss(pred, x0, noise)
        return loss * float("nan") if calls["n"] == 6 else loss

    monkeypatch.setattr(loss_module, "flow_loss", poisoned)
    data = micro_dataset(tmp_path / "data")
    threads = torch.get_num_threads()
    try:
        cfg = micro_config(data_workers=0, log_every=4, checkpoint_every=6, orthogonality_step=0.05)
        result = Trainer(cfg, data, tmp_path / "run", max_steps=12, progress=False).train()
    finally:
        torch.set_num_threads(threads)
    assert host_sync.BLOCKED == [] and calls["n"] == 12
    losses = np.array(result.losses)
    assert len(losses) == 12 and np.isnan(losses[5]) and np.isfinite(np.delete(losses, 5)).all()
    assert result.nonfinite_skipped == 1
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [4, 8, 12]
    np.testing.assert_allclose([e.value for e in logged], losses[[3, 7, 11]], rtol=1e-6)
    assert [e.step for e in events.Scalars("routing/layer00/no_expert_share")] == [4, 8, 12]
