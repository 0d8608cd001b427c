"""The loop that trains adapters on a frozen model, shared by LoRA fine-tuning and distillation: the one training
step per iteration, losses read back only at logging steps and checkpoints (where the non-finite streak is
checked), atomic checkpoints of the adapters, their optimizers and the run state."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch.nn as nn
from torch.optim import Optimizer

from ..progress import progress as progress_bar
from . import checkpoint as ckpt
from .config import changed_fields
from .state import TrainState
from .step import StepOutput, train_step


def check_run_dir(run_dir: Path, config_name: str, cfg, kind: str, resume: bool) -> None:
    """Create `run_dir`, refusing one that already holds a run unless resuming, and a resume whose config (a
    dataclass with `to_dict` / `from_dict`, saved as `config_name`) differs from the saved one. A config saved in
    an older layout compares as its current one. `kind` names the run in the error ("fine-tuning")."""
    config_file = run_dir / config_name
    if config_file.exists():
        if not resume:
            raise ValueError(
                f"run folder {str(run_dir)!r} already holds a {kind} run; pass --resume to continue it or choose a "
                f"new --out"
            )
        saved = type(cfg).from_dict(json.loads(config_file.read_text())).to_dict()
        diff = changed_fields(saved, cfg.to_dict())
        if diff:
            raise ValueError(f"--resume with a different config than {config_file}: fields {diff} differ")
    run_dir.mkdir(parents=True, exist_ok=True)


def train_adapters(
    model: nn.Module,
    adapters: Mapping[str, nn.Parameter],
    optimizers: Mapping[str, Optimizer],
    micro_batch: Callable[[], Any],
    loss_fn,
    cfg,
    state: TrainState,
    run_dir: Path,
    end: int,
    record: dict,
    desc: str,
    show_progress: bool = True,
    postfix: Callable[[StepOutput, TrainState], dict] | None = None,
    after_checkpoint: Callable[[int], object] | None = None,
    extra_optimizers: Mapping[str, Optimizer] | None = None,
) -> None:
    """Run steps until `state.step == end`. `cfg` carries optimizer, checkpoint_every, log_every, keep_last and
    max_nonfinite_in_a_row; `record` is the config saved with each checkpoint; `postfix` adds to the progress bar
    at logging steps (the loss is always shown); `after_checkpoint(step)` runs after each checkpoint is saved (a
    validation pass); `extra_optimizers` are saved and restored with the checkpoints but stepped by the loss
    function itself (distillation's fake score)."""
    with progress_bar(total=end, initial=state.step, disable=not show_progress, desc=desc, unit="step") as bar:
        while state.step < end:
            out = train_step(
                model,
                list(optimizers.values()),
                [micro_batch()],
                loss_fn,
                cfg.optimizer,
                state.step,
                params=list(adapters.values()),
                total_steps=end,
            )
            state.record(out.loss, out.applied, out.grad_norm)
            bar.update(1)
            save = state.step % cfg.checkpoint_every == 0 or state.step == end
            if save or state.step % cfg.log_every == 0:
                state.flush(limit=cfg.max_nonfinite_in_a_row, last_checkpoint=lambda: ckpt.latest_checkpoint(run_dir))
                bar.set_postfix(loss=f"{state.losses[-1]:.5f}", **(postfix(out, state) if postfix else {}))
            if save:
                saved = {**optimizers, **(extra_optimizers or {})}
                ckpt.save_checkpoint(run_dir, adapters, record, saved, state, cfg.keep_last)
                if after_checkpoint is not None:
                    after_checkpoint(state.step)
