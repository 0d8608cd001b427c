"""What a run leaves in a log and on the CPU: plain progress lines when the output is not a terminal, no library
noise (torchao's CPU-only load failures, FSDP2's view warning, which is checked to be harmless here), and the
`--threads` plumbing with its default."""

import io
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch

from nucleus_image.progress import PlainProgress, progress
from nucleus_image.threads import default_threads, threads_for_command


def test_progress_writes_plain_periodic_lines_when_not_a_terminal(monkeypatch):
    out = io.StringIO()
    monkeypatch.setenv("NUCLEUS_PROGRESS_INTERVAL", "0")
    with progress(total=5, desc="train", unit="step", file=out) as bar:
        assert isinstance(bar, PlainProgress)
        for step in range(5):
            bar.update(1)
            bar.set_postfix(loss=f"{1 / (step + 1):.2f}")
    text = out.getvalue()
    # A line per update (interval 0), and a last one at the end because the postfix changed after the last update.
    assert "\r" not in text and text.count("\n") == 6, text
    assert text.splitlines()[-1].startswith("train: 100% 5/5") and "loss=0.20" in text.splitlines()[-1]
    # The default interval keeps a log short: one line at the end for quick work.
    monkeypatch.delenv("NUCLEUS_PROGRESS_INTERVAL")
    quiet = io.StringIO()
    assert list(progress(range(1000), desc="x", file=quiet)) == list(range(1000))
    assert quiet.getvalue().count("\n") == 1 and "1000/1000" in quiet.getvalue()


def test_a_command_in_a_pipe_logs_lines_not_carriage_returns(tmp_path):
    """`nucleus data synth` with stdout and stderr captured (not a terminal): no carriage returns."""
    env = dict(os.environ, NUCLEUS_PROGRESS_INTERVAL="0")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "nucleus_image",
            "data",
            "synth",
            "--out",
            str(tmp_path / "d"),
            "--num",
            "8",
            "--size",
            "32",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr and "synthesizing: 100% 8/8" in result.stderr


def test_torchao_cpu_only_load_failures_are_not_printed():
    pytest.importorskip("peft")
    result = subprocess.run(
        [sys.executable, "-c", "import nucleus_image, peft, torchao"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    if torch.version.cuda is None:
        assert "Failed to load" not in result.stderr and "Enum subclass" not in result.stderr, result.stderr


def test_fsdp2_view_warning_comes_only_from_the_text_projection_and_is_filtered():
    """The one FSDP2 unit that returns a view is the text-side Linear, whose output is read out of place only;
    parallelize's filter hides exactly that warning."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from nucleus_image.model import NucleusConfig, NucleusTransformer
    from nucleus_image.parallel.parallelize import ignore_view_warning

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        cfg = NucleusConfig.preset("tiny")
        model = NucleusTransformer(cfg)
        mesh = init_device_mesh("cpu", (1,))
        for blk in model.transformer_blocks:  # the units parallelize() makes
            for unit in (blk.encoder_proj, blk.attn.add_k_proj, blk.attn.add_v_proj, blk.attn.norm_added_k, blk):
                fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(
                hidden_states=torch.randn(2, 16, cfg.in_channels),
                img_shapes=[(1, 4, 4)] * 2,
                encoder_hidden_states=torch.randn(2, 8, cfg.joint_attention_dim),
                encoder_hidden_states_mask=torch.ones(2, 8, dtype=torch.bool),
                timestep=torch.rand(2),
            ).sample
            out.square().mean().backward()
        views = [str(w.message) for w in caught if "returned a view tensor" in str(w.message)]
        assert views and all(m.startswith("FSDP2-wrapped module (FSDPLinear)") for m in views), views
        with warnings.catch_warnings():
            ignore_view_warning()  # what parallelize() installs (on import and on every call)
            assert any(f[0] == "ignore" and f[1] is not None and f[1].match(views[0]) for f in warnings.filters)
    finally:
        dist.destroy_process_group()


def test_threads_default_and_restore(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == (3, "OMP_NUM_THREADS=3")
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = len(os.sched_getaffinity(0))
    assert default_threads() == (cores, f"{cores} cores")
    before = torch.get_num_threads()
    with threads_for_command(1) as count:
        assert count == 1 and torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    assert torch.get_num_threads() == before and "OMP_NUM_THREADS" not in os.environ


def test_the_command_sets_its_threads_and_the_wait_policy():
    script = (
        "import os, sys; from nucleus_image.cli import main; import nucleus_image.cli.generate as g;"
        "g.run = lambda args: print(args.threads_used, os.environ['OMP_NUM_THREADS'], "
        "os.environ['OMP_WAIT_POLICY'], __import__('torch').get_num_threads()) or 0;"
        "sys.exit(main(sys.argv[1:]))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run(
        [sys.executable, "-c", script, "generate", "--model", "m", "--prompt", "x", "--out", "o", "--threads", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1", "PASSIVE", "1"]
