"""Training under torch.distributed on CPU (gloo, real processes launched as a user would: `nucleus train
--nproc N`, one thread each, fp32) equals the one-process run on the same global batch.

Not bitwise: FSDP averages two half-batch gradient means where one process takes the mean of the full batch,
and gloo's sum rounds differently; the differences start at ~1e-7 relative in the gradients and AdamW's
normalisation lifts them to ~1e-6 absolute in rarely-updated weights after a few steps. Hence losses are
compared at 1e-6 relative and weights at 2e-5 absolute (updates are lr = 3e-3 per step). A missing 1/dp on the
expert gradients, a wrong data slice or a lost optimizer state on resume shows up orders of magnitude above.

Losses and weights alone can hide a wrong gradient scale: Muon's update ignores a uniform scale of a matrix's
gradient, so an expert gradient divided by the wrong degree trains the same. Every run therefore also compares
the global gradient norm of every step (recorded before clipping) with the one-process run's, at GRAD_RTOL.

Select with `pytest -m distributed`; each multi-process run takes 20-60 s on a 2-core machine."""

import json
import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from training_helpers import cli, micro_config, micro_dataset, run_cli

from nucleus_image.parallel.config import ParallelConfig, check_layout
from nucleus_image.training.checkpoint import is_distributed, list_checkpoints, load_model_state
from nucleus_image.training.merge import merge_run

pytestmark = pytest.mark.distributed

STEPS = 10
GRAD_RTOL = 1e-4
HOOKS = Path(__file__).parent / "process_hooks"


def env(**extra) -> dict:
    # Built at call time: the session's private text-state cache (conftest) is in os.environ only by then.
    return dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1", **extra)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = micro_dataset(root / "data")
    config = root / "micro.json"
    # Batches divisible by 4 processes; checkpoints every 3 steps so runs can stop and resume mid-stage.
    micro_config(
        **{"stages.0.steps": 8, "stages.1.steps": 2, "stages.1.batch_size": 4, "checkpoint_every": 3, "keep_last": 8}
    ).save_json(config)
    straight = root / "one"
    done = run_cli("train", "--config", str(config), "--data", str(data), "--out", str(straight), "--no-progress")
    assert done.returncode == 0, done.stderr[-3000:]
    return root, data, config, straight


def _train(data, out, *args, config=None, guard=False):
    """`nucleus train` in a subprocess; `guard`: every process under the host-sync guard (tests/test_step.py)."""
    extra = ("--config", str(config)) if config else ("--resume",)
    guarded = {"PYTHONPATH": str(HOOKS), "NUCLEUS_HOST_SYNC_GUARD": "1"} if guard else {}
    done = subprocess.run(
        cli("train", *extra, "--data", str(data), "--out", str(out), "--no-progress", *args),
        capture_output=True,
        text=True,
        timeout=400,
        env=env(**guarded),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _assert_matches(run: Path, straight: Path, step: int = STEPS):
    final, ref = list_checkpoints(run)[-1][1], dict(list_checkpoints(straight))[step]
    assert final.name == ref.name == f"step-{step:08d}"
    saved, ref_saved = (json.loads((p / "trainer.json").read_text()) for p in (final, ref))
    assert len(saved["losses"]) == len(ref_saved["losses"]) == step
    torch.testing.assert_close(torch.tensor(saved["losses"]), torch.tensor(ref_saved["losses"]), rtol=1e-6, atol=0)
    # Every step's gradient norm, the segments of a resumed run included.
    norms, ref_norms = torch.tensor(saved["grad_norms"]), torch.tensor(ref_saved["grad_norms"])
    assert len(norms) == step and bool((norms > 0).all())
    print(
        f"{run.name}: gradient norms of {step} steps, max relative difference "
        f"{float(((norms - ref_norms).abs() / ref_norms).max()):.2e}"
    )
    torch.testing.assert_close(norms, ref_norms, rtol=GRAD_RTOL, atol=0)
    a, b = load_model_state(final), load_model_state(ref)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-5, msg=lambda m, key=key: f"{key}: {m}")


def _rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process | None:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "nucleus_image" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    return None


def test_fsdp_two_processes_sigkill_of_one_rank_then_resume(setup):
    """dp_shard=2: one rank is SIGKILLed after the step-3 checkpoint; the launcher stops the other; resuming
    with --nproc 2 and two accumulation steps finishes the run equal to the one-process run, and the sample grid
    both processes drew from the sharded model is the one-process run's."""
    root, data, config, straight = setup
    out = root / "fsdp"
    launcher = subprocess.Popen(
        cli("train", "--config", str(config), "--data", str(data), "--out", str(out), "--no-progress", "--nproc", "2"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env(),
    )
    deadline = time.time() + 300
    while not list_checkpoints(out):
        assert launcher.poll() is None, launcher.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "timed out waiting for the first checkpoint"
        time.sleep(0.02)
    victim = _rank_process(launcher, 1)
    assert victim is not None
    victim.send_signal(signal.SIGKILL)
    launcher.wait(timeout=120)
    launcher.stderr.close()
    assert launcher.returncode != 0
    left = [s for s, _ in list_checkpoints(out)]
    assert max(left) < STEPS and all(is_distributed(p) for _, p in list_checkpoints(out))
    done = _train(data, out, "--nproc", "2", "--set", "grad_accum_steps=2")
    assert f"at step {max(left)}" in done.stdout
    _assert_matches(out, straight)
    grid, ref = (
        np.asarray(Image.open(run / "samples" / f"step-{STEPS:08d}.png"), dtype=np.int16) for run in (out, straight)
    )
    assert grid.shape == ref.shape and np.abs(grid - ref).max() <= 2 and np.abs(grid - ref).mean() < 0.05


def test_fsdp_x_ep_at_4_processes_resharded_to_2_then_1(setup):
    """dp_shard=4 x ep=2 (experts FSDP-sharded over efsdp=2) for 4 steps, resumed by 2 processes with ep=2 (one
    expert pair per rank) to step 6, then by one plain process to the end; then `nucleus merge` reads the
    distributed and the one-process checkpoints alike."""
    root, data, config, straight = setup
    out = root / "reshard"
    _train(data, out, "--nproc", "4", "--set", "parallel.ep=2", "--max-steps", "4", config=config)
    assert [s for s, _ in list_checkpoints(out)] == [3, 4]
    _train(data, out, "--nproc", "2", "--max-steps", "6")
    _train(data, out)
    kinds = {s: is_distributed(p) for s, p in list_checkpoints(out)}
    assert kinds == {3: True, 4: True, 6: True, 9: False, 10: False}
    _assert_matches(out, straight)

    # Steps 6 (written by 2 processes), 9 and 10 (by one), against the same steps of the one-process run.
    merged = merge_run(out, 3, "uniform", root / "merged")
    reference = merge_run(straight, 3, "uniform", root / "merged-one")
    a = load_model_state_dir(merged)
    b = load_model_state_dir(reference)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=2e-5)


def test_one_process_checkpoint_resumes_at_2_processes_with_ep_through_a_ctrl_c(setup):
    """A run started in one process (safetensors checkpoints) continues under --nproc 2 with ep=2 from its step-3
    checkpoint (the full state is handed to the sharded model and optimizers). Ctrl-C (SIGINT to the process
    group, as a terminal sends it) after the step-6 checkpoint: both processes agree on one step boundary, save
    it together and exit 130; the printed resume command finishes the run equal to the one-process run."""
    root, data, config, straight = setup
    out = shutil.copytree(straight, root / "scale-out")
    for step, path in list_checkpoints(out):
        if step > 3:
            shutil.rmtree(path)
    run = subprocess.Popen(
        cli(
            "train",
            "--resume",
            "--data",
            str(data),
            "--out",
            str(out),
            "--no-progress",
            "--nproc",
            "2",
            "--set",
            "parallel.ep=2",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env(PYTHONPATH=str(HOOKS), NUCLEUS_STEP_DELAY="0.5"),
    )
    deadline = time.time() + 300
    while 6 not in dict(list_checkpoints(out)):
        assert run.poll() is None and time.time() < deadline, run.communicate()[1][-3000:]
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGINT)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 130, stderr[-3000:]
    assert "at step 3" in stdout and "resume with:" in stderr and "Traceback" not in stderr
    step, path = list_checkpoints(out)[-1]
    assert 6 < step < STEPS and is_distributed(path) and (path / "interrupted.json").exists()
    _train(data, out, "--nproc", "2")
    _assert_matches(out, straight)


def test_hsdp_x_ep_at_4_processes(setup):
    """dp_replicate=2 x dp_shard=2 with ep=2: two replicas, each FSDP-sharded over 2 processes that hold 2
    experts each; 3 steps equal the one-process run's. Every process runs under the host-sync guard: its steps
    read no tensor back outside logging steps and checkpoints (steps 1 and 2 here), FSDP and EP included."""
    root, data, config, straight = setup
    out = root / "hsdp"
    done = _train(
        data,
        out,
        "--nproc",
        "4",
        "--set",
        "parallel.dp_replicate=2",
        "--set",
        "parallel.ep=2",
        "--max-steps",
        "3",
        config=config,
        guard=True,
    )
    assert done.stderr.count("host-sync guard: on") >= 4  # the launcher's and every worker's
    _assert_matches(out, straight, step=3)


def test_gradient_accumulation_matches_the_full_batch(setup):
    """grad_accum_steps=2 in one process: two half-batch micro-steps per optimizer step, the same update."""
    root, data, config, straight = setup
    out = root / "accum"
    _train(data, out, "--set", "grad_accum_steps=2", "--max-steps", "3", config=config)
    _assert_matches(out, straight, step=3)


def test_meta_init_materialises_distinct_shards(setup):
    """parallel.init=meta: built on the meta device, each rank initialises only its shards. The numbers differ
    from one process's init by design; what must hold is the init's distribution and that no shard repeats
    another (on CPU each rank draws its shards itself)."""
    root, data, config, straight = setup
    out = root / "meta"
    _train(
        data,
        out,
        "--nproc",
        "2",
        "--set",
        "parallel.init=meta",
        "--set",
        "parallel.ep=2",
        "--max-steps",
        "1",
        config=config,
    )
    ((step, path),) = list_checkpoints(out)
    state = load_model_state(path)
    experts = state["transformer_blocks.1.img_mlp.experts.gate_up_proj"]  # experts 0-1 on rank 0, 2-3 on rank 1
    assert abs(float(experts.std()) * experts.shape[1] ** 0.5 - 1.0) < 0.05
    assert not torch.allclose(experts[:2], experts[2:], atol=0.05)
    q = state["transformer_blocks.0.attn.to_q.weight"]  # rows split over the 2 ranks
    assert not torch.allclose(q[: q.shape[0] // 2], q[q.shape[0] // 2 :], atol=0.05)
    assert math.isfinite(json.loads((path / "trainer.json").read_text())["losses"][0])


def load_model_state_dir(pipeline_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(pipeline_dir / "transformer" / "diffusion_pytorch_model.safetensors")


def test_layouts_are_checked_before_any_work(setup, tmp_path):
    root, data, config, straight = setup
    with pytest.raises(ValueError, match=r"parallel.ep=3 must divide parallel.dp_shard=4"):
        ParallelConfig(ep=3).resolve(4)
    with pytest.raises(ValueError, match=r"dp_replicate \* parallel.dp_shard = 2 \* 3 = 6, but 4 processes"):
        ParallelConfig(dp_replicate=2, dp_shard=3).resolve(4)
    with pytest.raises(ValueError, match=r"parallel.ep=8 must divide model.num_experts=4"):
        check_layout(ParallelConfig(ep=8).resolve(8), 4, {"a": 8}, 1)
    with pytest.raises(ValueError, match=r"stage b: batch_size 6 .* grad_accum_steps \* processes = 2 \* 2 = 4"):
        check_layout(ParallelConfig().resolve(2), 4, {"a": 8, "b": 6}, 2)
    # The CLI refuses in one line, before starting any process.
    done = run_cli("train", "--config", str(config), "--data", str(data), "--out", str(tmp_path / "x"), "--nproc", "3")
    assert done.returncode == 2 and "not divisible by grad_accum_steps * processes = 1 * 3 = 3" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x").exists()
    # --resume on other data (here: a copy elsewhere) is refused by name.
    other = shutil.copytree(data, tmp_path / "other-data")
    done = run_cli("train", "--data", str(other), "--out", str(straight), "--resume", "--no-progress")
    assert done.returncode == 2 and "--resume with different data" in done.stderr
