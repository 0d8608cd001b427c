"""Exact resume: a run killed with SIGKILL (between steps, or in the middle of writing a checkpoint) and resumed
with `nucleus train --resume` reproduces the uninterrupted run: the same loss at every step and bitwise
identical final weights and optimizer state on CPU."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import legacy_layout, micro_config, micro_dataset, run_cli

from nucleus_image.training.checkpoint import list_checkpoints

STEPS = 30

# Runs the real CLI in a subprocess; the patch only slows it down (a sleep after each step, or in the middle of
# one checkpoint write, after a marker file says where it is), so that the parent's SIGKILL lands mid-run.
WRAPPER = """
import sys, time
from pathlib import Path
import nucleus_image.training.checkpoint as ckpt
import nucleus_image.training.trainer as trainer
mode, marker = sys.argv[1], Path(sys.argv[2])
if mode == "steps":
    step = trainer.Trainer._train_step
    def slow_step(self, *a, **k):
        out = step(self, *a, **k)
        time.sleep(0.2)
        return out
    trainer.Trainer._train_step = slow_step
else:
    save = ckpt.save_file
    def slow_save(tensors, path, *a, **k):
        save(tensors, path, *a, **k)
        if ".tmp-step-00000010" in str(path):
            marker.write_text(str(path))
            time.sleep(120)
    ckpt.save_file = slow_save
from nucleus_image.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = micro_dataset(root / "data")
    config = root / "micro.json"
    micro_config().save_json(config)
    straight = root / "straight"
    done = run_cli(
        "train",
        "--config",
        str(config),
        "--data",
        str(data),
        "--out",
        str(straight),
        "--max-steps",
        str(STEPS),
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root, data, config, straight


def _killed_run(root, data, config, name, mode, ready):
    out = root / name
    marker = root / f"{name}.marker"
    args = [
        "train",
        "--config",
        str(config),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-steps",
        str(STEPS),
        "--no-progress",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, mode, str(marker), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONHASHSEED="0"),
    )
    deadline = time.time() + 240
    while not ready(out, marker):
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline, "timed out waiting for the run to reach the kill point"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return out


def _assert_identical(run, straight):
    assert json.loads((run / "losses.json").read_text()) == json.loads((straight / "losses.json").read_text())
    final, ref = list_checkpoints(run)[-1][1], list_checkpoints(straight)[-1][1]
    assert final.name == ref.name == f"step-{STEPS:08d}"
    for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
        a, b = load_file(final / name), load_file(ref / name)
        assert set(a) == set(b)
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs"
    trainer_a, trainer_b = (json.loads((p / "trainer.json").read_text()) for p in (final, ref))
    assert trainer_a == trainer_b


def test_sigkill_between_steps_then_resume_is_exact(setup):
    root, data, config, straight = setup
    run = _killed_run(
        root, data, config, "killed", "steps", lambda out, _: any(s >= 10 for s, _ in list_checkpoints(out))
    )
    steps_left = [s for s, _ in list_checkpoints(run)]
    assert max(steps_left) < STEPS and not (run / "losses.json").exists()  # it really died mid-run
    done = run_cli(
        "train", "--data", str(data), "--out", str(run), "--max-steps", str(STEPS), "--resume", "--no-progress"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and f"at step {max(steps_left)}" in done.stdout
    _assert_identical(run, straight)


def test_sigkill_during_checkpoint_write_keeps_previous_checkpoint(setup):
    root, data, config, straight = setup
    run = _killed_run(root, data, config, "killed_in_save", "save", lambda out, marker: marker.exists())
    # The half-written checkpoint is a temp folder: invisible to resume; the previous one is complete.
    assert [s for s, _ in list_checkpoints(run)] == [5]
    stray = list((run / "checkpoints").glob(".tmp-step-00000010-*"))
    assert len(stray) == 1 and (stray[0] / "model.safetensors").exists() and not (stray[0] / "trainer.json").exists()
    previous = run / "checkpoints" / "step-00000005"
    assert json.loads((previous / "trainer.json").read_text())["step"] == 5
    assert load_file(previous / "model.safetensors")  # loadable

    done = run_cli(
        "train", "--data", str(data), "--out", str(run), "--max-steps", str(STEPS), "--resume", "--no-progress"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 5" in done.stdout
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the next save cleaned the stray folder
    _assert_identical(run, straight)


def test_run_with_a_config_in_the_old_flat_layout_resumes_exactly(setup):
    """A run folder whose train_config.json predates the nested optimizer section (flat lr, adam_betas, ...)
    resumes, and its checkpoints continue the same run."""
    root, data, config, straight = setup
    run = shutil.copytree(straight, root / "old-layout")
    for step, path in list_checkpoints(run):
        if step > 25:
            shutil.rmtree(path)
    (run / "losses.json").unlink()
    saved = json.loads((run / "train_config.json").read_text())
    (run / "train_config.json").write_text(json.dumps(legacy_layout(saved), indent=1) + "\n")
    done = run_cli(
        "train", "--data", str(data), "--out", str(run), "--max-steps", str(STEPS), "--resume", "--no-progress"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "at step 25" in done.stdout
    _assert_identical(run, straight)


def test_resume_refuses_a_changed_config(setup):
    root, data, config, straight = setup
    done = run_cli("train", "--data", str(data), "--out", str(straight), "--resume", "--set", "lr=0.5", "--no-progress")
    assert done.returncode == 2 and "fields ['optimizer.lr'] differ" in done.stderr
    again = run_cli("train", "--config", str(config), "--data", str(data), "--out", str(straight), "--no-progress")
    assert again.returncode == 2 and "pass --resume" in again.stderr


def test_nonfinite_losses_are_skipped_counted_and_stop_the_run(setup, tmp_path, monkeypatch):
    import nucleus_image.training.loss as loss_module
    from nucleus_image.training.trainer import NonFiniteLossError, Trainer

    root, data, config, straight = setup
    real_loss, calls = loss_module.flow_loss, {"n": 0}

    def poisoned(pred, x0, noise):  # step 3 (0-based 2) once, then every step from 7 on
        calls["n"] += 1
        loss = real_loss(pred, x0, noise)
        return loss * float("nan") if calls["n"] == 3 or calls["n"] >= 8 else loss

    monkeypatch.setattr(loss_module, "flow_loss", poisoned)
    threads = torch.get_num_threads()
    trainer = Trainer(micro_config(max_nonfinite_in_a_row=3), data, tmp_path / "run", progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    try:
        with pytest.raises(NonFiniteLossError, match=r"3 non-finite losses in a row at step 9.*step-00000005"):
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    losses = trainer.losses
    assert len(losses) == 10 and np.isnan(losses[2]) and np.isnan(losses[7:]).all() and np.isfinite(losses[3:7]).all()
    assert trainer.nonfinite == 4  # the lone one was skipped and counted, training went on
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [5]  # the last good checkpoint, intact
    saved = load_file(tmp_path / "run" / "checkpoints" / "step-00000005" / "model.safetensors")
    assert any(not torch.equal(saved[k], before[k]) for k in saved) and all(
        torch.isfinite(v).all() for v in saved.values()
    )
