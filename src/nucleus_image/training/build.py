"""The parts a training run is built from, each a small function, called by `Trainer` in this order (as
TorchTitan's trainer builds its parts): the device and process group, the run folder, the seeds, the data, the
encoders and the caption cache (`build_text_states`), the model (meta init, `parallelize`), the optimizers
(`optim.build_optimizers`) and the resume.

Every function that a refused start can stop in runs before anything is written, so a bad start leaves no run.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from ..data.manifest import latest_version_dir
from ..data.text_states import TextStateStore, encoder_id
from ..model import NucleusTransformer
from ..parallel.config import ParallelConfig, check_layout
from ..parallel.mesh import ParallelDims, init_parallel, launched_world
from . import checkpoint as ckpt
from .config import TrainConfig, changed_fields
from .data_loader import ManifestRows, drawable_captions
from .encoders import build_encoders, check_text_width, text_encoder_spec
from .state import TrainState


def resolve_device(name: str) -> torch.device:
    """ "auto": the GPU when there is one, else the CPU; anything else as torch names it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_parallel(cfg: TrainConfig, device: torch.device) -> ParallelDims | None:
    """The process group and meshes of a torchrun-launched run, after checking its layout against the model and
    the stages; None for one process started directly (the plain path, which ignores `parallel`)."""
    world = launched_world()
    layout = cfg.parallel.resolve(world) if world > 1 else ParallelConfig(1, 1, 1)
    check_layout(layout, cfg.model.num_experts, {s.name: s.batch_size for s in cfg.stages}, cfg.grad_accum_steps)
    if world > 1 and cfg.time_budget_s:
        # Each rank would time its own steps and could plan a different number of them.
        raise ValueError(
            f"time_budget_s={cfg.time_budget_s} is for one process; with {world} processes set "
            f"the stages' steps instead (time_budget_s=0)"
        )
    return init_parallel(cfg.parallel, device) if world > 1 else None


def check_run_dir(run_dir: Path, cfg: TrainConfig, resume: bool, is_main: bool) -> None:
    """Refuse a folder holding another run (without --resume) or a resume with a changed config. The layout may
    change on resume (`parallel` and `grad_accum_steps`: checkpoints reshard, and the same global batch gives the
    same step in any split), and a config saved in an older layout compares as its current one."""
    config_file = run_dir / "train_config.json"
    if config_file.exists():
        if not resume:
            raise ValueError(
                f"run folder {str(run_dir)!r} already holds a run; pass --resume to continue it or choose a new --out"
            )
        saved = TrainConfig.from_dict(json.loads(config_file.read_text())).to_dict()
        current = cfg.to_dict()
        layout = ("parallel", "grad_accum_steps")
        diff = changed_fields(
            {k: v for k, v in saved.items() if k not in layout}, {k: v for k, v in current.items() if k not in layout}
        )
        if diff:
            raise ValueError(f"--resume with a different config than {config_file}: fields {diff} differ")
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)


def seed_everything(seed: int) -> None:
    """The global torch, numpy and python RNGs (model init and anything drawing from them)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def data_record(data_dir: Path, rows: ManifestRows, run_dir: Path, resume: bool) -> dict:
    """The data a run trains on (folder, manifest version, rows), as data.json records it; a resume on other data
    is refused instead of silently drawing different rows."""
    record = {
        "data": str(data_dir.resolve()),
        "manifest_version": latest_version_dir(data_dir).name,
        "rows": len(rows.paths),
    }
    saved_file = run_dir / "data.json"
    if resume and saved_file.exists():
        saved = json.loads(saved_file.read_text())
        if saved != record:
            raise ValueError(
                f"--resume with different data: the run trained on {saved} but --data gives "
                f"{record}; pass the run's data folder or start a new --out"
            )
    return record


def build_model(cfg: TrainConfig, dims: ParallelDims | None, device: torch.device, bf16: bool) -> NucleusTransformer:
    """The transformer, sharded when several processes train it. parallel.init "full": the seeded full init of one
    process on every rank, then sharded (N processes start from the same weights as one). "meta": no rank ever
    holds the whole model; each initialises its own shards."""
    meta_init = dims is not None and cfg.parallel.init == "meta"
    if meta_init:
        with torch.device("meta"):
            model = NucleusTransformer(cfg.model)
    else:
        model = NucleusTransformer(cfg.model).to(device)  # initialised on the CPU generator
    if dims is None:
        if cfg.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model
    from ..parallel.parallelize import parallelize

    parallelize(
        model, dims, activation_checkpointing=cfg.gradient_checkpointing, compile=cfg.parallel.compile, bf16=bf16
    )
    if meta_init:
        model.to_empty(device=device)
        if device.type != "cuda":
            # DTensor tracks random offsets per shard only on CUDA; elsewhere each rank fills its local shards from
            # the global generator, so seed it per shard position (replicas hold the same shards and draw the same
            # numbers), or every shard would repeat the first one's values.
            torch.manual_seed(cfg.seed + 1 + dims.dp_shard_mesh.get_local_rank())
        model.reset_parameters()
    return model


def build_text_states(
    cfg: TrainConfig, rows: ManifestRows, device: torch.device, is_main: bool, progress: bool, barrier
) -> tuple[TextStateStore, torch.nn.Module]:
    """The frozen encoders' part of a run: the autoencoder, and the text states of every caption a batch can draw
    and of the sample prompts, in the text-state cache shared across runs. Rank 0 alone loads the text encoder,
    and only if a caption is missing (none after `nucleus data encode-captions`): it encodes them while the others
    wait, and lets the encoder go (Qwen3-VL would hold ~16.5 GB of a GPU for the whole run); then every rank reads
    states from the cache: the training batches in the data workers, the sample grids' prompts when it draws them.
    Both are checked against the model's widths before the model exists."""
    store = TextStateStore(encoder_id(text_encoder_spec(cfg)))
    captions = drawable_captions(rows, cfg.caption_weights) | set(cfg.sample_prompts)
    missing = store.missing(captions) if is_main else []
    # On a forked RNG, so the model's seeded init is the same whether or not the encoders draw random numbers.
    with torch.random.fork_rng(devices=[]):
        text_encoder, autoencoder = build_encoders(cfg, device, load_text_encoder=bool(missing))
        if text_encoder is not None:
            store.encode_missing(text_encoder, missing, progress)
    del text_encoder
    if device.type == "cuda":
        torch.cuda.empty_cache()
    barrier()
    store.refresh()
    check_text_width(cfg, store.get("").shape[-1])
    return store, autoencoder


def resume_latest(run_dir: Path, model, optimizers: dict, state: TrainState, distributed: bool) -> Path | None:
    """Load the newest complete checkpoint of the run into the model, optimizers and state; None if it has none."""
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is not None:
        ckpt.load_checkpoint(latest, model, optimizers, state, distributed=distributed)
    return latest
