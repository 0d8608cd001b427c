"""Ctrl-C and reruns, through the real `nucleus` command in subprocesses, with 2 CPU threads:

- two fresh `nucleus train` runs give bitwise identical weights;
- SIGINT during `train` exits cleanly (no traceback) after saving a checkpoint and printing the resume command;
  running that command finishes the run with the uninterrupted run's losses and weights, bit for bit;
- SIGINT during `generate` says what was written; the same command continues the job to the same files as an
  uninterrupted run, and another job into that folder is refused;
- generated PNGs carry their settings as text, files follow the umask, and a Hub id loads from the hub cache."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from generation_fixtures import tiny_own_pipeline
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from training_helpers import cli, micro_config, micro_dataset, run_cli

STEPS = 30
ENV = dict(os.environ, PYTHONHASHSEED="0")


def interrupt_when(command: list[str], ready, timeout: float = 300) -> subprocess.CompletedProcess:
    """Start `command`, send SIGINT once `ready()` holds, and wait for it to exit."""
    # A shell without job control starts background commands with SIGINT ignored, and Python keeps an ignored
    # SIGINT ignored: give the command the default disposition so the test means the same however it is started.
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def final_weights(run_dir):
    return load_file(run_dir / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")


def test_train_fresh_runs_agree_and_interrupt_resumes_exactly(tmp_path):
    data = micro_dataset(tmp_path / "data")
    config = tmp_path / "micro.json"
    micro_config(cpu_threads=2).save_json(config)
    args = ["train", "--config", str(config), "--data", str(data), "--max-steps", str(STEPS), "--no-progress"]
    for name in ("first", "second"):
        done = run_cli(*args, "--out", str(tmp_path / name))
        assert done.returncode == 0, done.stderr[-3000:]
    assert "dataset: 48 images" in done.stdout and f"planned: {STEPS} steps" in done.stdout
    first, second = final_weights(tmp_path / "first"), final_weights(tmp_path / "second")
    assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)
    events = EventAccumulator(str(tmp_path / "first" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [STEPS]  # the sample grid, in TensorBoard too
    merged = run_cli("merge", str(tmp_path / "first"), "--last", "5", "--out", str(tmp_path / "merged"))
    assert (
        merged.returncode == 0
        and "asked for the last 5 checkpoints" in merged.stdout
        and "(steps 20, 25, 30)" in merged.stdout
    ), merged.stdout + merged.stderr[-2000:]

    stopped = tmp_path / "stopped"
    result = interrupt_when(
        cli(*args, "--out", str(stopped)), lambda: (stopped / "checkpoints" / "step-00000010").is_dir()
    )
    assert result.returncode == 130, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    resume = [line for line in result.stderr.splitlines() if line.startswith("resume with: ")]
    assert len(resume) == 1, result.stderr[-3000:]
    command = shlex.split(resume[0].removeprefix("resume with: "))
    assert command[:2] == ["nucleus", "train"] and command[-1] == "--resume"
    saved = sorted(p.name for p in (stopped / "checkpoints").iterdir())
    assert 10 <= int(saved[-1].removeprefix("step-")) < STEPS

    resumed = subprocess.run(cli(*command[1:]), capture_output=True, text=True, timeout=300, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((stopped / "losses.json").read_text()) == json.loads(
        (tmp_path / "first" / "losses.json").read_text()
    )
    again = final_weights(stopped)
    assert all(np.array_equal(first[k].numpy(), again[k].numpy()) for k in first)
    umask = os.umask(0)
    os.umask(umask)
    weights = stopped / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"
    assert os.stat(weights).st_mode & 0o777 == 0o666 & ~umask  # safetensors alone writes 0600


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("interrupt") / "model"
    tiny_own_pipeline().save_pretrained(path)
    return path


def test_generate_interrupt_continues_to_the_uninterrupted_result(model_dir, tmp_path):
    args = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "a red cube",
        "--prompt",
        "a blue sphere",
        "--num-images",
        "60",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--seed",
        "3",
    ]
    out = tmp_path / "out"
    result = interrupt_when(cli(*args, "--out", str(out)), lambda: (out / "00007.json").exists())
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "rerun the same command to continue" in result.stderr
    written = len(list(out.glob("*.json"))) - 1  # generate.json is the job
    assert 8 <= written < 120

    rerun = subprocess.run(cli(*args, "--out", str(out)), capture_output=True, text=True, timeout=300, env=ENV)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"continuing: {written} of 120" in rerun.stderr
    straight = tmp_path / "straight"
    done = subprocess.run(cli(*args, "--out", str(straight)), capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in straight.iterdir())
    assert len(names) == 241 and names == sorted(p.name for p in out.iterdir())
    assert all((out / n).read_bytes() == (straight / n).read_bytes() for n in names)

    other = subprocess.run(
        cli(*args[:-1], "4", "--out", str(out)), capture_output=True, text=True, timeout=300, env=ENV
    )
    assert other.returncode == 2 and "holds another generate job (different seed)" in other.stderr

    image = Image.open(out / "00005.png")
    assert "Seed: 8" in image.text["parameters"] and image.text["parameters"].startswith("a red cube\n")
    sidecar = json.loads((out / "00005.json").read_text())
    # The PNG holds the sidecar without the file name, so the sidecar's command rewrites the same bytes.
    assert json.loads(image.text["nucleus_image"]) == {k: v for k, v in sidecar.items() if k != "image"}
    umask = os.umask(0)
    os.umask(umask)
    for path in (out / "00005.png", model_dir / "transformer" / "diffusion_pytorch_model.safetensors"):
        assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask, path


def test_hub_id_loads_from_the_hub_cache_offline(model_dir, tmp_path):
    # The layout huggingface_hub itself writes: models--OWNER--NAME/{refs/main, snapshots/COMMIT/...}.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-nucleus"
    shutil.copytree(model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = dict(ENV, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    args = ["generate", "--prompt", "a red cube", "--steps", "2"]
    for model, out in (("someone/tiny-nucleus", "hub"), (str(model_dir), "local")):
        done = subprocess.run(
            cli(*args, "--model", model, "--out", str(tmp_path / out)),
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "hub" / "00000.png")), np.asarray(Image.open(tmp_path / "local" / "00000.png"))
    )
    assert json.loads((tmp_path / "hub" / "00000.json").read_text())["model"] == "someone/tiny-nucleus"
    missing = subprocess.run(
        cli(*args, "--model", "someone/absent", "--out", str(tmp_path / "x")),
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert (
        missing.returncode == 2
        and "'someone/absent' is neither a local folder nor a Hugging Face Hub" in missing.stderr
        and "Traceback" not in missing.stderr
    )
