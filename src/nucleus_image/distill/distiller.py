"""`nucleus distill`: a few-step, guidance-free student of a pipeline, trained as a LoRA adapter.

    nucleus distill --model runs/demo/merged --data runs/demo/data --out runs/distill --steps 4

Method (why, and the numbers the papers report, in docs/distillation.md): trajectory distillation with the
guidance folded in. The teacher is the pipeline as it samples (`teacher_steps` Euler steps with classifier-free
guidance: two transformer rows per step); its trajectories are generated once, batched, from fixed noise seeds and
captions drawn from the dataset's manifest (text states from the shared text-state cache), and kept at the
student's K noise levels (`trajectories.py`). The student, the base transformer plus a LoRA adapter, takes K Euler
steps with one row per image and learns to land each step on the teacher's state (`objective.py`), on its own
rollout as Simple and Fast Distillation does. This objective never calls the teacher in training, so its cost is paid
once: K x M x 2 rows per trajectory (M = teacher steps per student step) against the student's K rows per
trajectory and update. `matching.weight > 0` adds DMD2's distribution-matching term (distribution_matching.py:
a fake-score adapter on the same base, trained online; the guided base as the real score), at 3 more rows per
trajectory and update plus the fake score's updates.

Validation: `validation_trajectories` more teacher trajectories, drawn under another seed (their noise and captions
share no draw with training's), are scored with the same objective at the start and at every checkpoint, so the gap
between the training loss and a held-out one shows when the student memorises its trajectories instead of learning
the teacher (the remedy is more trajectories, not more updates).

Writes RUN/distill_config.json, RUN/teacher/ and RUN/teacher-validation/ (the trajectories; a rerun keeps complete
shards), RUN/checkpoints/step-*/ (adapter, optimizer and RNG states: `--resume` continues a killed run to the same
adapter bit for bit on CPU), RUN/losses.json, RUN/validation.json (step, loss, per student step) and RUN/adapter/:
peft's format with the sampler settings (steps, sigmas, guidance 1) in its adapter_config.json, which
`NucleusPipeline.load_lora` and `nucleus generate --lora` take as their defaults.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from nucleus_image.adapters import add_lora, write_sampler_settings
from nucleus_image.adapters.lora import adapter_rank, load_adapter_weights
from nucleus_image.data.manifest import read_manifest
from nucleus_image.data.text_states import CaptionStates, TextStateStore, encoder_id
from nucleus_image.diffusion.sampler_settings import SamplerSettings
from nucleus_image.pipeline import NucleusPipeline
from nucleus_image.training import checkpoint as ckpt
from nucleus_image.training.adapter_loop import check_run_dir, train_adapters
from nucleus_image.training.build import seed_everything
from nucleus_image.training.config import OptimizerConfig, from_plain, to_plain
from nucleus_image.training.optim import build_optimizers
from nucleus_image.training.state import TrainState

from .distribution_matching import (
    MatchingConfig,
    MatchingDraws,
    MatchingObjective,
    add_fake_score,
    draw,
    fake_score_optimizers,
)
from .objective import ROLLOUTS, TrajectoryBatch, TrajectoryObjective
from .trajectories import TrajectoryPlan, TrajectoryStore, generate_trajectories, shard_captions

CONFIG_NAME = "distill_config.json"
VALIDATION_FILE = "validation.json"
# The validation trajectories' plan seed is the run's plus this: shard draws are functions of (plan seed, shard), so
# they share no noise or caption draw with any training run of a seed below it.
VALIDATION_SEED_OFFSET = 2**32


def default_optimizer() -> OptimizerConfig:
    """Distillation's optimizer: Muon for the adapters' matrices, AdamW for the rest, as fine-tuning; the adapters
    start at zero, so a short warmup."""
    return OptimizerConfig(lr=4e-3, warmup_steps=20)


@dataclass
class DistillConfig:
    model: str  # the teacher: a pipeline folder whose transformer the adapter adapts
    data: str  # a dataset folder holding manifest-vNNNN/: its captions are the prompts distilled on
    student_steps: int = 4
    student_sigmas: tuple[float, ...] = ()  # the student's levels before the shift; empty: linspace(1, 1/K, K)
    teacher_steps: int = 16  # a multiple of student_steps
    teacher_guidance: float = 4.0
    trajectories: int = 2048
    validation_trajectories: int = 256  # held-out teacher trajectories scored at every checkpoint; 0: none
    teacher_batch_size: int = 64
    resolution: int = 0  # square side in pixels; 0: the pipeline's native size
    caption_weights: tuple[float, ...] = ()  # over each image's captions, low to high granularity; empty: uniform
    lora_rank: int = 32
    lora_alpha: float | None = None
    init_adapter: str = ""  # a saved adapter of the same rank the student starts from; empty: zero (the base)
    rollout: str = "student"
    steps: int = 500  # optimizer steps
    batch_size: int = 32  # trajectories per step
    optimizer: OptimizerConfig = field(default_factory=default_optimizer)
    matching: MatchingConfig = field(default_factory=MatchingConfig)  # DMD2's term; off at weight 0
    seed: int = 0
    checkpoint_every: int = 100
    keep_last: int = 3
    log_every: int = 25
    max_nonfinite_in_a_row: int = 5  # steps skipped for a non-finite gradient before the run stops
    cpu_threads: int = 0
    device: str = "auto"

    def validate(self) -> None:
        errors = []
        for name in (
            "student_steps",
            "teacher_steps",
            "trajectories",
            "teacher_batch_size",
            "lora_rank",
            "steps",
            "batch_size",
            "checkpoint_every",
            "keep_last",
            "log_every",
            "max_nonfinite_in_a_row",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"{name}={value!r} must be a positive integer")
        if not errors and self.teacher_steps % self.student_steps:
            errors.append(
                f"teacher_steps={self.teacher_steps} must be a multiple of student_steps="
                f"{self.student_steps} (the teacher must pass through the student's noise levels)"
            )
        if self.student_sigmas and len(self.student_sigmas) != self.student_steps:
            errors.append(
                f"student_sigmas has {len(self.student_sigmas)} levels for student_steps={self.student_steps}"
            )
        if self.rollout not in ROLLOUTS:
            errors.append(f"rollout={self.rollout!r}; accepted: {', '.join(ROLLOUTS)}")
        if not math.isfinite(self.teacher_guidance):
            errors.append(f"teacher_guidance={self.teacher_guidance!r} must be a finite number")
        if isinstance(self.validation_trajectories, bool) or not isinstance(self.validation_trajectories, int):
            errors.append(f"validation_trajectories={self.validation_trajectories!r} must be an integer >= 0")
        elif self.validation_trajectories < 0:
            errors.append(f"validation_trajectories={self.validation_trajectories!r} must be >= 0 (0: no validation)")
        if self.resolution < 0:
            errors.append(f"resolution={self.resolution!r} must be >= 0 (0: the model's native size)")
        if self.init_adapter and not errors:
            try:
                rank = adapter_rank(self.init_adapter)
            except (OSError, ValueError) as err:
                errors.append(f"init_adapter: {err}")
            else:
                if rank != self.lora_rank:
                    errors.append(f"init_adapter {self.init_adapter!r} has rank {rank}, lora_rank is {self.lora_rank}")
        errors += self.optimizer.errors() + self.matching.errors()
        if errors:
            raise ValueError("distill config: " + "; ".join(errors))

    def sigmas(self) -> tuple[float, ...]:
        """The student's noise levels before the shift (the pipeline's default linspace unless set)."""
        if self.student_sigmas:
            return tuple(float(s) for s in self.student_sigmas)
        return tuple(float(s) for s in np.linspace(1.0, 1.0 / self.student_steps, self.student_steps))

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict) -> DistillConfig:
        return from_plain(cls, data, "DistillConfig")


class Distiller:
    def __init__(self, cfg: DistillConfig, run_dir: str | Path, resume: bool = False, progress: bool = True):
        cfg.validate()
        self.started = time.perf_counter()
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        check_run_dir(self.run_dir, CONFIG_NAME, cfg, "distillation", resume)
        self.device = torch.device(
            "cuda"
            if cfg.device == "auto" and torch.cuda.is_available()
            else "cpu"
            if cfg.device == "auto"
            else cfg.device
        )
        if self.device.type == "cpu" and cfg.cpu_threads > 0:
            torch.set_num_threads(cfg.cpu_threads)
        seed_everything(cfg.seed)
        self.state = TrainState()  # every step's batch is a function of (seed, step): no stream to carry

        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.pipe = NucleusPipeline.from_pretrained(cfg.model, dtype=dtype, device=self.device)
        if self.pipe.text_encoder is None:
            raise ValueError(f"pipeline {cfg.model!r} has no text encoder; distillation encodes the captions with it")
        self.pipe.text_encoder.requires_grad_(False)
        (self.run_dir / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        self.store, self.validation = self._teacher_trajectories()

        side = cfg.resolution or self.pipe.sample_size
        grid = side // self.pipe.granularity
        self.img_shapes = [(1, grid, grid)] * cfg.batch_size
        # The levels and timesteps exactly as the pipeline computes them for the student's sampler.
        sigma_K1 = self.pipe.schedule.sigmas(cfg.student_steps, grid * grid, list(cfg.sigmas())).to(self.device)
        steps = self.pipe.schedule.num_train_timesteps
        self.objective = TrajectoryObjective(sigma_K1, sigma_K1[:-1] * steps / steps, cfg.rollout)

        self.model = add_lora(self.pipe.transformer, cfg.lora_rank, cfg.lora_alpha)
        if cfg.init_adapter:
            load_adapter_weights(self.model, cfg.init_adapter)
        self.model.train()
        ns_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        muon, adamw, _ = build_optimizers(self.model, cfg.optimizer, ns_dtype)
        self.optimizers = {k: o for k, o in (("muon", muon), ("adamw", adamw)) if o is not None}
        # The fake score's optimizers are stepped by its objective, not by the loop; saved with the run.
        self.fake_optimizers: dict = {}
        self.loss_fn: TrajectoryObjective | MatchingObjective = self.objective
        if cfg.matching.enabled:
            self.loss_fn = self._matching_objective(ns_dtype)
        self.adapters = nn.ParameterDict(
            {n.replace(".", "/"): p for n, p in self.model.named_parameters() if p.requires_grad}
        )
        if resume and (latest := ckpt.latest_checkpoint(self.run_dir)) is not None:
            ckpt.load_checkpoint(latest, self.adapters, {**self.optimizers, **self.fake_optimizers}, self.state)
            self._log(f"resumed from {latest} at step {self.state.step}")
        # Entries past the resumed step belong to steps about to be redone (the same values: a killed run may have
        # validated after its last checkpoint).
        file = self.run_dir / VALIDATION_FILE
        saved = json.loads(file.read_text()) if resume and file.exists() else []
        self.validation_log: list[dict] = [v for v in saved if v["step"] <= self.state.step]

    @property
    def step(self) -> int:
        return self.state.step

    def _matching_objective(self, ns_dtype: torch.dtype) -> MatchingObjective:
        """The fake score's adapter and optimizers (the student's recipe, at `matching.fake_lr` when set), and the
        objective that adds the distribution-matching term."""
        cfg = self.cfg
        fake_params = add_fake_score(self.model, cfg.matching.fake_rank or cfg.lora_rank, cfg.lora_alpha)
        fake_cfg = replace(cfg.optimizer, lr=cfg.matching.fake_lr or cfg.optimizer.lr)
        optimizers = fake_score_optimizers(self.model, fake_params, fake_cfg, ns_dtype)
        self.fake_optimizers = {f"fake_{type(o).__name__.lower()}": o for o in optimizers}
        return MatchingObjective(
            self.objective,
            cfg.matching,
            cfg.teacher_guidance,
            fake_params,
            list(self.fake_optimizers.values()),
            fake_cfg,
        )

    def _log(self, text: str) -> None:
        if self.progress:
            print(text, flush=True)

    def _teacher_trajectories(self) -> tuple[TrajectoryStore, TrajectoryStore | None]:
        """The training trajectories and the validation ones (None without `validation_trajectories`)."""
        cfg = self.cfg
        table = read_manifest(cfg.data)
        row_captions = [[c for c in caps if c] for caps in table.column("captions").to_pylist()]
        weights = np.array([float(bool(caps)) for caps in row_captions])
        if not weights.any():
            raise ValueError(f"no captioned row in the manifest of {cfg.data!r}: distillation prompts come from it")
        side = cfg.resolution or self.pipe.sample_size
        if side % self.pipe.granularity:
            raise ValueError(
                f"resolution {side} is not a multiple of the model's pixel granularity {self.pipe.granularity}"
            )
        plan = TrajectoryPlan(
            student_sigmas=cfg.sigmas(),
            teacher_steps=cfg.teacher_steps,
            teacher_guidance=cfg.teacher_guidance,
            height=side,
            width=side,
            trajectories=cfg.trajectories,
            shard_size=256,
            seed=cfg.seed,
            caption_weights=cfg.caption_weights,
        )
        held_out = cfg.validation_trajectories
        validation_plan = (
            replace(plan, trajectories=held_out, seed=cfg.seed + VALIDATION_SEED_OFFSET) if held_out else None
        )
        # Only the captions some trajectory uses are encoded (into the text-state cache shared with training).
        plans = [p for p in (plan, validation_plan) if p is not None]
        used = {c for p in plans for s in range(p.num_shards) for c in shard_captions(p, s, row_captions, weights)}
        store = TextStateStore(encoder_id(f"pipeline:{cfg.model}"))
        encoded = store.encode_missing(self.pipe.text_encoder, used | {""}, self.progress)
        self.text = CaptionStates(store, self.device)
        self._log(
            f"distill: {len(used)} captions ({encoded} newly encoded); teacher {cfg.teacher_steps} steps with "
            f"guidance {cfg.teacher_guidance:g} ({2 if cfg.teacher_guidance > 1 else 1} rows/step) -> student "
            f"{cfg.student_steps} steps, 1 row/step, levels {[round(s, 4) for s in cfg.sigmas()]}"
        )
        start = time.perf_counter()
        self.pipe.transformer.eval()
        stores = [
            generate_trajectories(
                self.pipe, p, self.text, row_captions, weights, self.run_dir / folder, cfg.teacher_batch_size, self._log
            )
            for p, folder in ((plan, "teacher"), (validation_plan, "teacher-validation"))
            if p is not None
        ]
        self._log(
            f"teacher trajectories: {' + '.join(str(len(s)) for s in stores)} (training + validation) ready "
            f"({time.perf_counter() - start:.1f} s)"
        )
        return stores[0], stores[1] if len(stores) > 1 else None

    def _batch_rows(self, step: int) -> np.ndarray:
        """Trajectories of optimizer step `step`: a pure function of (seed, step), so resume needs nothing else."""
        rng = np.random.default_rng([self.cfg.seed, 7, step])
        return rng.choice(len(self.store), size=self.cfg.batch_size, replace=len(self.store) < self.cfg.batch_size)

    def _micro_batch(self) -> TrajectoryBatch:
        rows = self._batch_rows(self.state.step)
        captions = [self.store.captions[r] for r in rows]
        text, mask = self.text.batch(captions)
        states = self.store.states[torch.from_numpy(rows)].to(self.device)
        return TrajectoryBatch(states, text, mask, self.img_shapes, self._matching_draws(captions, states))

    def _matching_draws(self, captions: list[str], states: torch.Tensor) -> MatchingDraws | None:
        """The distribution-matching term's draws for this step, a function of (seed, step); None when it is off."""
        cfg, step = self.cfg, self.state.step
        if not cfg.matching.enabled:
            return None
        seed = int(np.random.default_rng([cfg.seed, 11, step]).integers(2**62))
        shape = tuple(states.shape[2:])
        drawn = draw(seed, cfg.matching, len(captions), cfg.student_steps, shape, self.device)
        text, mask = self.text.batch(captions + [""] * len(captions))
        return MatchingDraws(**drawn, guided_text_RLD=text, guided_mask_RL=mask, step=step)

    def validate(self, step: int) -> dict | None:
        """The objective on the validation trajectories (batches of `batch_size`, no gradients), recorded for
        `step` in RUN/validation.json; None without validation trajectories."""
        store = self.validation
        if store is None:
            return None
        bs, training = self.cfg.batch_size, self.model.training
        self.model.eval()
        total, per_step = torch.zeros((), device=self.device), torch.zeros(self.cfg.student_steps, device=self.device)
        with torch.no_grad():
            for i in range(0, len(store), bs):
                captions = store.captions[i : i + bs]
                text, mask = self.text.batch(captions)
                states = store.states[i : i + bs].to(self.device)
                loss, logged = self.objective(
                    self.model, TrajectoryBatch(states, text, mask, self.img_shapes[: len(captions)])
                )
                total += loss * len(captions)
                per_step += logged["per_step"] * len(captions)
        self.model.train(training)
        entry = {"step": step, "loss": float(total) / len(store), "per_step": (per_step / len(store)).tolist()}
        self.validation_log = [v for v in self.validation_log if v["step"] < step] + [entry]
        file = self.run_dir / VALIDATION_FILE
        tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(self.validation_log) + "\n")
        os.replace(tmp, file)
        self._log(
            f"validation at step {step}: loss {entry['loss']:.5f} on {len(store)} held-out trajectories "
            f"(per student step {' '.join(f'{v:.4f}' for v in entry['per_step'])})"
        )
        return entry

    def train(self, max_steps: int | None = None) -> list[float]:
        """Train to cfg.steps (or stop after `max_steps` in total); a finished run writes RUN/adapter/. Losses are
        read back every `log_every` steps and at checkpoints; a step with a non-finite gradient is skipped and
        counted, and `max_nonfinite_in_a_row` of them stop the run. The validation loss is measured before the
        first step and after every checkpoint."""
        cfg, state = self.cfg, self.state
        end = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
        if self.validation is not None and not any(v["step"] == state.step for v in self.validation_log):
            self.validate(state.step)
        train_adapters(
            self.model,
            self.adapters,
            self.optimizers,
            self._micro_batch,
            self.loss_fn,
            cfg,
            state,
            self.run_dir,
            end,
            {"distill": cfg.to_dict()},
            "distill",
            self.progress,
            postfix=self._postfix,
            after_checkpoint=self.validate,
            extra_optimizers=self.fake_optimizers,
        )
        (self.run_dir / "losses.json").write_text(json.dumps(state.losses) + "\n")
        if state.step >= cfg.steps:
            self.write_adapter(self.run_dir / "adapter")
        return state.losses

    @staticmethod
    def _postfix(out, _state) -> dict:
        shown = {"per_student_step": " ".join(f"{v:.4f}" for v in out.logged["per_step"].tolist())}
        for key in ("matching_grad", "fake_loss"):
            if key in out.logged:
                shown[key] = f"{float(out.logged[key]):.4f}"
        return shown

    def write_adapter(self, folder: Path) -> Path:
        """peft's adapter files plus the student's sampler settings in its adapter_config.json, written into a
        temp folder and renamed into place, so `folder` is only ever a complete adapter."""
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(str(tmp), selected_adapters=["default"])  # the student's, not the fake score's
        write_sampler_settings(tmp, self.sampler_settings())
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder

    def sampler_settings(self) -> SamplerSettings:
        return SamplerSettings(num_inference_steps=self.cfg.student_steps, guidance_scale=1.0, sigmas=self.cfg.sigmas())
