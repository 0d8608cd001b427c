"""Checkpoints: written atomically, never pickled, the last N kept, the newest complete one found on resume.

Layout of RUN_DIR/checkpoints/step-00001200/:
    model.safetensors      the transformer's state dict (diffusers key names)
    config.json            the transformer config (diffusers format)
    optimizer.safetensors  every optimizer state tensor, keyed "<optimizer>.<param index>.<state key>"
    optimizer.json         the optimizers' param groups and non-tensor state
    rng.safetensors        torch CPU (and CUDA) RNG states and the run's torch generator state (if it has one)
    trainer.json           the run's `TrainState` (step, counters, sampler position, loss history) and the
                           numpy/python RNG states
    heads.safetensors      training-only heads outside the model (an alignment head) and their optimizer's
    heads.json             tensors / param groups, when the run's state has heads; never merged or exported
    ema.safetensors        the moving average of the transformer's weights (float32, the model's key names), when
                           the run keeps one (`ema_decay` > 0); `nucleus merge --ema` exports it

A run of several processes (FSDP2 / expert parallelism) writes `dcp/` instead of the model and optimizer files:
a `torch.distributed.checkpoint` of {"model", "optim"} from `get_state_dict` (keys are parameter FQNs, the same
diffusers names, with each rank writing its own shards), which loads into any other layout or into one plain
process (resharding). Every rank draws the same random streams, so rank 0's RNG and trainer state are the run's.

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

from .state import TrainState

STEP_DIR = re.compile(r"^step-(\d{8})$")
COMMON_FILES = ("config.json", "rng.safetensors", "trainer.json")
FILES = ("model.safetensors", "optimizer.safetensors", "optimizer.json") + COMMON_FILES
DCP_DIR = "dcp"
HEADS_FILES = ("heads.safetensors", "heads.json")
EMA_FILE = "ema.safetensors"


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
        if m and p.is_dir() and _complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def _complete(path: Path) -> bool:
    return all((path / f).is_file() for f in FILES) or (
        is_distributed(path) and all((path / f).is_file() for f in COMMON_FILES)
    )


def is_distributed(path: str | Path) -> bool:
    """Whether a checkpoint folder holds a torch.distributed.checkpoint (written by several processes)."""
    return (Path(path) / DCP_DIR / ".metadata").is_file()


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


def _optimizer_from_flat(
    optimizers: dict[str, torch.optim.Optimizer], tensors: dict[str, torch.Tensor], meta: dict
) -> None:
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
def save_checkpoint(
    run_dir: str | Path,
    model: torch.nn.Module,
    model_config: dict,
    optimizers: dict[str, torch.optim.Optimizer],
    state: TrainState,
    keep_last: int,
) -> Path:
    """Write checkpoint `state.step` atomically, then delete all but the newest `keep_last` complete ones."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}-{os.getpid()}"
    tmp.mkdir()

    weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "model.safetensors")
    opt_tensors, opt_meta = _optimizer_to_flat(optimizers)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    (tmp / "optimizer.json").write_text(json.dumps(opt_meta) + "\n")
    _write_run_state(tmp, model_config, state)
    _publish(run_dir, tmp, final, keep_last)
    return final


def _write_run_state(tmp: Path, model_config: dict, state: TrainState) -> None:
    (tmp / "config.json").write_text(json.dumps(model_config, indent=1) + "\n")
    rng = {"torch_cpu": torch.get_rng_state()}
    if state.generator is not None:
        rng["generator"] = state.generator.get_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, tmp / "rng.safetensors")
    np_state = np.random.get_state()
    py_state = random.getstate()
    host_rng = {
        "numpy_global": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if state.np_rng is not None:
        host_rng["numpy_generator"] = state.np_rng.bit_generator.state
    trainer = dict(state.state_dict(), rng=host_rng)
    (tmp / "trainer.json").write_text(json.dumps(trainer, default=_json_default) + "\n")
    if state.heads is not None:
        _write_heads(tmp, state)
    if state.ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.ema.state_dict().items()}, tmp / EMA_FILE)


def _write_heads(tmp: Path, state: TrainState) -> None:
    """The training-only heads (replicated: every rank holds the same, so rank 0's are the run's) and their
    optimizer, in files of their own: the model's weights never hold them."""
    tensors = {f"module.{k}": v.detach().contiguous().cpu() for k, v in state.heads.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_to_flat({"heads": state.heads_optimizer} if state.heads_optimizer else {})
    tensors.update({f"optim.{k}": v for k, v in opt_tensors.items()})
    save_file(tensors, tmp / HEADS_FILES[0])
    (tmp / HEADS_FILES[1]).write_text(json.dumps(opt_meta) + "\n")


def _load_heads(path: Path, state: TrainState) -> None:
    if not all((path / f).is_file() for f in HEADS_FILES):
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} has no {HEADS_FILES[0]}: it was saved by a run without the "
            f"training-only heads this config trains (e.g. alignment_weight=0)"
        )
    device = str(next(state.heads.parameters()).device)
    tensors = load_file(path / HEADS_FILES[0], device=device)
    state.heads.load_state_dict({k[len("module.") :]: v for k, v in tensors.items() if k.startswith("module.")})
    if state.heads_optimizer is not None:
        _optimizer_from_flat(
            {"heads": state.heads_optimizer},
            {k[len("optim.") :]: v for k, v in tensors.items() if k.startswith("optim.")},
            json.loads((path / HEADS_FILES[1]).read_text()),
        )


def _publish(run_dir: str | Path, tmp: Path, final: Path, keep_last: int) -> None:
    """Make a fully written temp folder the checkpoint `final` (one rename), then keep the newest `keep_last`."""
    apply_umask(tmp)
    _fsync_dir(tmp)
    if (tmp / DCP_DIR).is_dir():
        _fsync_dir(tmp / DCP_DIR)
    if final.exists():  # a rerun of the same step (e.g. after a resume) replaces it
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)
    for _, old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def save_distributed(
    run_dir: str | Path,
    model: torch.nn.Module,
    model_config: dict,
    optimizers: dict[str, torch.optim.Optimizer],
    state: TrainState,
    keep_last: int,
    dims,
) -> Path:
    """`save_checkpoint` for a sharded model, called on every rank of `dims` (its `ParallelDims`): each writes
    its shards with DCP into the same temp folder; rank 0 adds the RNG/trainer state and renames the folder when
    every rank is done."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from ..parallel.collectives import barrier

    root = checkpoint_dir(run_dir)
    final = root / f"step-{state.step:08d}"
    tmp = root / f".tmp-step-{state.step:08d}-dist"
    if dims.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier(dims)
    model_sd, optim_sd = get_state_dict(model, list(optimizers.values()))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp / DCP_DIR)
    barrier(dims)
    if dims.is_main:
        _write_run_state(tmp, model_config, state)
        _publish(run_dir, tmp, final, keep_last)
    barrier(dims)
    return final


INTERRUPTED = "interrupted.json"


def mark_interrupted(path: Path) -> None:
    """Flag a checkpoint saved off the cadence on an interrupt: it resumes the run but is not merged, so a resumed
    run merges the same checkpoints as an uninterrupted one."""
    (path / INTERRUPTED).write_text(
        json.dumps({"note": "saved on an interrupt; resumes the run, skipped by merge"}) + "\n"
    )


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizers: dict[str, torch.optim.Optimizer],
    state: TrainState,
    distributed: bool = False,
) -> None:
    """Restore model, optimizers, the run's state and every RNG from a checkpoint folder.
    A DCP checkpoint loads into any layout (`distributed`: this process is one of several) or into one plain
    process; a one-process checkpoint loads into one process or, through its full state, into any layout."""
    path = Path(path)
    if is_distributed(path):
        _load_dcp(path, model, optimizers)
    elif distributed:
        _load_single_into_sharded(path, model, optimizers)
    else:
        missing = [f for f in FILES if not (path / f).is_file()]
        if missing:
            raise FileNotFoundError(f"checkpoint {str(path)!r} is incomplete: missing {missing}")
        device = next(model.parameters()).device
        model.load_state_dict(load_file(path / "model.safetensors", device=str(device)))
        _optimizer_from_flat(
            optimizers,
            load_file(path / "optimizer.safetensors", device=str(device)),
            json.loads((path / "optimizer.json").read_text()),
        )
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if state.generator is not None:
        state.generator.set_state(rng["generator"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda_"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    trainer = json.loads((path / "trainer.json").read_text())
    state.load_state_dict(trainer)
    if state.heads is not None:
        _load_heads(path, state)
    if state.ema is not None:
        state.ema.load_state_dict(load_ema_state(path, device=str(state.ema.shadow[0].device)))
    if state.np_rng is not None:
        state.np_rng.bit_generator.state = trainer["rng"]["numpy_generator"]
    g = trainer["rng"]["numpy_global"]
    np.random.set_state((g[0], np.array(g[1], dtype=np.uint32), *g[2:]))
    p = trainer["rng"]["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def _load_dcp(path: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_optimizer_state_dict

    # get_state_dict initialises empty optimizer state (a zero-lr step) so DCP has tensors to load into. That
    # step also gives state to parameters that never had a gradient (the unused norm_added_q), which the
    # checkpoint rightly lacks: leave those out, so they have no state after loading, as in the run that saved.
    opts = list(optimizers.values())
    model_sd, optim_sd = get_state_dict(model, opts)
    saved = dcp.FileSystemReader(str(path / DCP_DIR)).read_metadata().state_dict_metadata
    optim_sd["state"] = {
        fqn: st for fqn, st in optim_sd["state"].items() if all(f"optim.state.{fqn}.{key}" in saved for key in st)
    }
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path / DCP_DIR)
    # dcp.load wrote the parameters in place (get_state_dict's tensors alias them): setting the model state again
    # would copy the expert shards into fresh tensors that FSDP no longer gathers from. The optimizer state is
    # set, not strict for those stateless parameters (every model key was required by dcp.load above).
    set_optimizer_state_dict(model, opts, state["optim"], options=StateDictOptions(strict=False))


def _load_single_into_sharded(path: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer]) -> None:
    """A one-process checkpoint into a sharded model: the full state, named by FQN, handed to `set_*_state_dict`,
    which keeps each rank's part. The flat optimizer files index parameters by their order in the optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    full = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load_file(path / "model.safetensors"), options=full)
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, meta = load_file(path / "optimizer.safetensors"), json.loads((path / "optimizer.json").read_text())
    state: dict[str, dict] = {}
    groups = []
    for opt_name, opt in optimizers.items():
        order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
        for key, value in tensors.items():
            name, idx, skey = key.split(".", 2)
            if name == opt_name:
                state.setdefault(order[int(idx)], {})[skey] = value
        for idx, scalars in meta[opt_name]["scalar_state"].items():
            state.setdefault(order[int(idx)], {}).update(scalars)
        for g in meta[opt_name]["param_groups"]:
            groups.append(
                dict(
                    g, params=[order[i] for i in g["params"]], **({"betas": tuple(g["betas"])} if "betas" in g else {})
                )
            )
    set_optimizer_state_dict(
        model,
        list(optimizers.values()),
        {"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True, strict=False),
    )


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The transformer's full state dict (diffusers key names) from a checkpoint folder of either kind, on CPU,
    without a process group: what `nucleus merge` reads."""
    path = Path(path)
    if not is_distributed(path):
        return load_file(path / "model.safetensors")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(path / DCP_DIR))
    meta = reader.read_metadata().state_dict_metadata
    state = {
        key.split(".", 1)[1]: torch.empty(m.size, dtype=m.properties.dtype)
        for key, m in meta.items()
        if key.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    loaded = {"model": state}
    dcp.load(loaded, storage_reader=reader)
    return loaded["model"]


def load_ema_state(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A checkpoint's moving average of the weights (ema.safetensors), refused by name when it has none."""
    file = Path(path) / EMA_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} has no {EMA_FILE}: it was saved by a run without an EMA of the weights "
            f"(ema_decay=0); train with --set ema_decay=0.999 (or another decay in (0, 1)) to keep one"
        )
    return load_file(file, device=device)


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
