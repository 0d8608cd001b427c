"""LoRA fine-tuning of a saved pipeline on a manifest dataset: frozen (optionally 8-bit) base, peft adapters, the
training package's pieces (caption cache, aspect buckets, logit-normal timesteps, flow loss, Muon + AdamW under
the WSM schedule, atomic checkpoints with exact resume). Only the loop is here, and it is short on purpose.

    nucleus finetune --model runs/demo/merged --data data/new_concept --out runs/lora --lora-rank 16 [--quantize int8]

Writes RUN/finetune_config.json, RUN/checkpoints/step-*/ (adapter weights, optimizer and RNG states: a killed run
`--resume`s to the same adapter bit for bit on CPU), RUN/losses.json and RUN/adapter/ (peft format), which
`NucleusPipeline.load_lora` reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from nucleus_image.adapters import add_lora
from nucleus_image.data.manifest import latest_version_dir, read_manifest
from nucleus_image.data.text_states import CaptionStates, TextStateStore, encoder_id
from nucleus_image.model.latents import pack_latents
from nucleus_image.pipeline import NucleusPipeline
from nucleus_image.training import checkpoint as ckpt
from nucleus_image.training.adapter_loop import check_run_dir, train_adapters
from nucleus_image.training.buckets import assign_buckets, draw_batch, fit_image, make_buckets, readable_image
from nucleus_image.training.build import seed_everything
from nucleus_image.training.config import (
    OptimizerConfig,
    TimestepConfig,
    from_plain,
    nest_legacy_optimizer,
    to_plain,
)
from nucleus_image.training.curriculum import caption_probabilities, pick_caption
from nucleus_image.training.loss import FlowBatch, FlowObjective
from nucleus_image.training.optim import build_optimizers
from nucleus_image.training.state import TrainState
from nucleus_image.training.timesteps import sample_sigmas

CONFIG_NAME = "finetune_config.json"


def default_optimizer() -> OptimizerConfig:
    """Fine-tuning's optimizer defaults: adapters start at zero and learn fast, so a higher lr, a short warmup."""
    return OptimizerConfig(lr=1e-3, warmup_steps=20)


@dataclass
class FinetuneConfig:
    model: str  # the pipeline folder whose transformer is adapted
    data: str  # the dataset folder holding manifest-vNNNN/
    lora_rank: int = 16
    lora_alpha: float | None = None  # None: the rank (update scaling 1)
    quantize: str | None = None  # "int8" | "fp8": QLoRA on 8-bit base weights
    steps: int = 300
    batch_size: int = 8
    resolution: int = 0  # 0: the pipeline's native size
    aspect_ratios: tuple[str, ...] = ("1:1",)
    optimizer: OptimizerConfig = field(default_factory=default_optimizer)
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    caption_dropout: float = 0.1
    caption_weights: tuple[float, ...] = ()
    seed: int = 0
    checkpoint_every: int = 100
    keep_last: int = 3
    log_every: int = 10  # steps between reading the losses back (the progress bar's loss)
    max_nonfinite_in_a_row: int = 5  # steps skipped for a non-finite gradient before the run stops
    cpu_threads: int = 0
    device: str = "auto"

    def validate(self) -> None:
        errors = []
        for name in (
            "steps",
            "batch_size",
            "checkpoint_every",
            "keep_last",
            "lora_rank",
            "log_every",
            "max_nonfinite_in_a_row",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                errors.append(f"{name}={value!r} must be a positive integer")
        if self.quantize not in (None, "int8", "fp8"):
            errors.append(f"quantize={self.quantize!r}; accepted: int8, fp8 or none")
        if not math.isfinite(self.optimizer.lr):
            errors.append(f"optimizer.lr={self.optimizer.lr!r} must be a positive number")
        errors += self.optimizer.errors()
        if not 0 <= self.caption_dropout < 1:
            errors.append(f"caption_dropout={self.caption_dropout!r} must be in [0, 1)")
        if errors:
            raise ValueError("finetune config: " + "; ".join(errors))

    def to_dict(self) -> dict:
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict) -> FinetuneConfig:
        """From `to_dict`'s output or a saved finetune_config.json (either optimizer layout)."""
        return from_plain(cls, nest_legacy_optimizer(data), "FinetuneConfig")


class Finetuner:
    def __init__(self, cfg: FinetuneConfig, run_dir: str | Path, resume: bool = False, progress: bool = True):
        cfg.validate()
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        check_run_dir(self.run_dir, CONFIG_NAME, cfg, "fine-tuning", resume)
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
        self.state = TrainState(
            generator=torch.Generator(self.device).manual_seed(cfg.seed), np_rng=np.random.default_rng(cfg.seed)
        )

        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.pipe = NucleusPipeline.from_pretrained(cfg.model, dtype=dtype, device=self.device, quantize=cfg.quantize)
        if self.pipe.text_encoder is None:
            raise ValueError(f"pipeline {cfg.model!r} has no text encoder; fine-tuning encodes the captions with it")
        self.pipe.text_encoder.requires_grad_(False)
        self._load_data()
        self.model = add_lora(self.pipe.transformer, cfg.lora_rank, cfg.lora_alpha)
        self.model.train()
        self.adapters = nn.ParameterDict(
            {n.replace(".", "/"): p for n, p in self.model.named_parameters() if p.requires_grad}
        )
        ns_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        muon, adamw, _ = build_optimizers(self.model, cfg.optimizer, ns_dtype)
        self.optimizers = {k: o for k, o in (("muon", muon), ("adamw", adamw)) if o is not None}
        self.objective = FlowObjective(self.pipe.transformer.config.patch_size, input_dtype=self.pipe.transformer.dtype)
        weights = [caption_probabilities(cfg.caption_weights, len(c)) for c in self.row_captions]
        drawable = [c for caps, w in zip(self.row_captions, weights) for c, p in zip(caps, w) if p > 0]
        # The text-state cache shared with training runs, keyed by the pipeline's text encoder files.
        store = TextStateStore(encoder_id(f"pipeline:{cfg.model}"))
        store.encode_missing(self.pipe.text_encoder, set(drawable) | {""}, progress)
        self.captions = CaptionStates(store, self.device)
        # Every state is cached now: the text encoder's memory goes back (Qwen3-VL holds ~16.5 GB of a GPU).
        self.pipe.text_encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

        (self.run_dir / CONFIG_NAME).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        if resume and (latest := ckpt.latest_checkpoint(self.run_dir)) is not None:
            ckpt.load_checkpoint(latest, self.adapters, self.optimizers, self.state)
            print(f"resumed from {latest} at step {self.state.step}")

    def _load_data(self) -> None:
        data = Path(self.cfg.data)
        table = read_manifest(data)
        if table.num_rows == 0:
            raise ValueError(f"the manifest in {str(data)!r} has no rows")
        root = latest_version_dir(data).parent
        paths = [Path(p) if Path(p).is_absolute() else root / p for p in table.column("image_path").to_pylist()]
        self.paths = paths
        self.row_captions = table.column("captions").to_pylist()
        readable = np.array([readable_image(p) for p in paths], dtype=np.float64)
        if not readable.any():
            raise ValueError(f"no readable image in {str(data)!r}")
        resolution = self.cfg.resolution or self.pipe.sample_size
        self.buckets = make_buckets(resolution, self.cfg.aspect_ratios, self.pipe.granularity)
        self.bucket_of_row = assign_buckets(
            table.column("width").to_numpy(), table.column("height").to_numpy(), self.buckets
        )
        self.row_weights = readable * np.array([bool(c) for c in self.row_captions])

    def _micro_batch(self) -> FlowBatch:
        """The step's batch: drawn from the run's generators, in order (they are checkpointed)."""
        cfg, patch = self.cfg, self.pipe.transformer.config.patch_size
        np_rng, generator = self.state.np_rng, self.state.generator
        bucket, rows = draw_batch(np_rng, self.bucket_of_row, self.row_weights, len(self.buckets), cfg.batch_size)
        captions = [pick_caption(np_rng, self.row_captions[r], cfg.caption_weights, cfg.caption_dropout) for r in rows]
        with torch.no_grad():
            size = self.buckets[bucket]
            images = torch.stack([fit_image(self.paths[r], size.width, size.height) for r in rows])
            latents = self.pipe.vae.encode(images.to(self.device).float() / 127.5 - 1.0)
        B, _, h, w = latents.shape
        x0 = pack_latents(latents, patch).float()
        text, text_mask = self.captions.batch(captions)
        noise = torch.randn(x0.shape, generator=generator, device=self.device, dtype=x0.dtype)
        sigma = sample_sigmas(B, x0.shape[1], cfg.timesteps, generator)
        return FlowBatch(x0, noise, sigma, text, text_mask, (h, w))

    def train(self, max_steps: int | None = None) -> list[float]:
        """Train to cfg.steps (or stop after `max_steps` in total), then write RUN/adapter/. Losses are read back
        every `log_every` steps and at checkpoints; a step with a non-finite gradient is skipped and counted."""
        cfg, state = self.cfg, self.state
        end = cfg.steps if max_steps is None else min(cfg.steps, max_steps)
        train_adapters(
            self.model,
            self.adapters,
            self.optimizers,
            self._micro_batch,
            self.objective,
            cfg,
            state,
            self.run_dir,
            end,
            {"lora": cfg.to_dict()},
            "finetune",
            self.progress,
        )
        (self.run_dir / "losses.json").write_text(json.dumps(state.losses) + "\n")
        self.model.save_pretrained(str(self.run_dir / "adapter"))
        return state.losses
