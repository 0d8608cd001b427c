"""Checkpoints: written atomically, never pickled, the last N kept, the newest complete one found on resume.

Layout of RUN_DIR/checkpoints/step-00001200/:
    model.safetensors      the transformer's state dict (diffusers key names)
    config.json            the transformer config (diffusers format)
    optimizer.safetensors  every optimizer state tensor, keyed "<optimizer>.<param index>.<state key>"
    optimizer.json         the optimizers' param groups and non-tensor state
    rng.safetensors        torch CPU (and CUDA) RNG states and the trainer's torch generator state
    trainer.json           step, counters, numpy/python RNG states, sampler position, loss history

A checkpoint is written into `.tmp-step-XXXXXXXX-<pid>` and renamed to `step-XXXXXXXX` only when every file
is on disk (fsynced), so a kill during a save leaves a stray temp folder (removed by the next save) and the
previous checkpoint untouched; a `step-*` folder therefore always holds a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nucleus_image.model.checkpoint import apply_umask

STEP_DIR = re.compile(r"^step-(\d{8})$")
FILES = ("model.safetensors", "config.json", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "trainer.json")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in FILES):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


# ---- optimizer state without pickle ----------------------------------------------------------------------------
def _optimizer_to_flat(optimizers: dict[str, torch.optim.Optimizer]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {}
    for opt_name, opt in optimizers.items():
        sd = opt.state_dict()
        scalars = {}
        for idx, state in sd["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{opt_name}.{idx}.{key}"] = value.detach().contiguous().cpu()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        meta[opt_name] = {"param_groups": sd["param_groups"], "scalar_state": scalars}
    return tensors, meta


def _optimizer_from_flat(optimizers: dict[str, torch.optim.Optimizer], tensors: dict[str, torch.Tensor], meta: dict) -> None:
    for opt_name, opt in optimizers.items():
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            name, idx, skey = key.split(".", 2)
            if name == opt_name:
                state.setdefault(int(idx), {})[skey] = value
        for idx, scalars in meta[opt_name]["scalar_state"].items():
            state.setdefault(int(idx), {}).update(scalars)
        groups = meta[opt_name]["param_groups"]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        opt.load_state_dict({"state": state, "param_groups": groups})


# ---- save / load -------------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, model_config: dict,
                    optimizers: dict[str, torch.optim.Optimizer], generator: torch.Generator,
                    np_rng: np.random.Generator, trainer_state: dict, keep_last: int) -> Path:
    """Write checkpoint `step` atomically, then delete all but the newest `keep_last` complete ones."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    tmp.mkdir()

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, tmp / "model.safetensors")
    (tmp / "config.json").write_text(json.dumps(model_config, indent=1) + "\n")
    opt_tensors, opt_meta = _optimizer_to_flat(optimizers)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta) + "\n")
    rng = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, tmp / "rng.safetensors")
    np_state = np.random.get_state()
    py_state = random.getstate()
    trainer = dict(trainer_state, step=step, rng={
        "numpy_generator": np_rng.bit_generator.state,
        "numpy_global": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    })
    (tmp / "trainer.json").write_text(json.dumps(trainer, default=_json_default) + "\n")
    apply_umask(tmp)
    _fsync_dir(tmp)
    if final.exists():  # a rerun of the same step (e.g. after a resume) replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)

    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


INTERRUPTED = "interrupted.json"


def mark_interrupted(path: Path) -> None:
    """Flag a checkpoint saved off the cadence on an interrupt: it resumes the run but is not merged, so a resumed
    run merges the same checkpoints as an uninterrupted one."""
    (path / INTERRUPTED).write_text(json.dumps({"note": "saved on an interrupt; resumes the run, skipped by merge"})
                                    + "\n")


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                    generator: torch.Generator, np_rng: np.random.Generator) -> dict:
    """Restore model, optimizers and every RNG from a checkpoint folder; returns trainer.json's content."""
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {str(path)!r} is incomplete: missing {missing}")
    device = next(model.parameters()).device
    model.load_state_dict(load_file(path / "model.safetensors", device=str(device)))
    _optimizer_from_flat(optimizers, load_file(path / "optimizer.safetensors", device=str(device)),
                         json.loads((path / "optimizer.json").read_text()))
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    generator.set_state(rng["generator"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    trainer = json.loads((path / "trainer.json").read_text())
    np_rng.bit_generator.state = trainer["rng"]["numpy_generator"]
    g = trainer["rng"]["numpy_global"]
    np.random.set_state((g[0], np.array(g[1], dtype=np.uint32), *g[2:]))
    p = trainer["rng"]["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    return trainer


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else ():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
