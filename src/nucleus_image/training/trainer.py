"""The training loop: stages of aspect-bucketed batches through the rectified-flow objective, Muon + AdamW under
Warmup-Stable-Merge, atomic checkpoints with exact resume, TensorBoard scalars, sample grids and a loss curve.

    nucleus train --preset tiny --data data/synth --out runs/tiny [--max-steps N] [--resume] [--set lr=3e-3]

Exact resume: everything random is drawn from two generators created here (torch for noise and sigmas, numpy
for batches and captions), whose states are checkpointed with the global ones; text embeddings are computed
one caption at a time so a caption's states never depend on when (or beside what) it was first encoded. A run
killed and resumed therefore reproduces the straight run's losses and weights bit for bit on CPU.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..data.manifest import latest_version_dir, read_manifest
from ..model import NucleusTransformer
from ..model.moe import MoELayer
from ..pipeline.pipeline import pack_latents
from . import checkpoint as ckpt
from .buckets import ImageCache, assign_buckets, draw_batch, make_buckets, readable_image
from .config import TrainConfig
from .curriculum import caption_probabilities, pick_caption, row_weights, share_by_bucket
from .monitor import RunLogger, routing_stats
from .loss import flow_loss, noisy_latents, router_orthogonality_loss, router_z_loss, wavelet_loss
from .optim import build_optimizers, describe_groups
from .sampling import make_pipeline, sample_grid
from .schedule import set_lr, wsm_lr
from .timesteps import sample_sigmas


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float]
    nonfinite_skipped: int
    images_per_second: float


def build_encoders(cfg: TrainConfig, device: torch.device):
    """The frozen text encoder and the autoencoder the config names, checked against the model's widths."""
    if cfg.text_encoder == "minilm":
        from ..encoders.minilm import MiniLMTextEncoder

        text_encoder = MiniLMTextEncoder()
    else:
        text_encoder = _from_pipeline_folder(cfg.text_encoder, "text_encoder", device)
    if cfg.autoencoder == "pixel":
        from ..encoders.pixel import PixelAutoencoder

        # Space-to-depth of RGB: the factor follows from the model's latent channels (3 * factor^2).
        factor = round(math.sqrt(cfg.model.latent_channels / 3))
        autoencoder = PixelAutoencoder(factor=max(factor, 1))
    else:
        autoencoder = _from_pipeline_folder(cfg.autoencoder, "vae", device)
    text_encoder = text_encoder.to(device).eval().requires_grad_(False)
    autoencoder = autoencoder.to(device).eval().requires_grad_(False)
    m = cfg.model
    if text_encoder.dim != m.joint_attention_dim:
        raise ValueError(f"text encoder {cfg.text_encoder!r} gives {text_encoder.dim}-wide states but the model's "
                         f"joint_attention_dim is {m.joint_attention_dim}")
    if autoencoder.latent_channels * m.patch_size**2 != m.in_channels:
        raise ValueError(f"autoencoder {cfg.autoencoder!r} has {autoencoder.latent_channels} latent channels; the model "
                         f"needs in_channels/patch_size^2 = {m.in_channels // m.patch_size**2}")
    return text_encoder, autoencoder


def _from_pipeline_folder(spec: str, component: str, device):
    if not spec.startswith("pipeline:"):
        raise ValueError(f"unknown {component} {spec!r}; accepted: 'minilm' / 'pixel' (built in) or "
                         f"'pipeline:DIR' (take it from a pipeline folder)")
    from ..pipeline.folder import load_components

    return load_components(spec.split(":", 1)[1], torch.float32, device)[component]


class CaptionCache:
    """Frozen text-encoder states for every caption the run can draw (and the empty prompt), computed once at
    the start in fixed chunks of the sorted caption list and stored in the run folder, so the states of a
    caption never depend on when it is first drawn or on a restart: exact resume needs that. Batches are
    right-padded to a multiple of 8 tokens with a mask, as the pipeline pads."""

    CHUNK = 64

    def __init__(self, text_encoder, captions: list[str], cache_file: Path, progress: bool = True):
        self.text_encoder = text_encoder
        self.index = {c: i for i, c in enumerate(sorted(set(captions) | {""}))}
        listing = cache_file.with_suffix(".json")
        if cache_file.exists() and listing.exists() and json.loads(listing.read_text()) == list(self.index):
            stored = load_file(cache_file, device=str(text_encoder.device))
            self.states = [stored[str(i)] for i in range(len(self.index))]
            return
        self.states = []
        ordered = list(self.index)
        for start in tqdm(range(0, len(ordered), self.CHUNK), desc="encoding captions", unit="chunk",
                          disable=not progress):
            with torch.no_grad():
                states, mask = text_encoder.encode_unique(ordered[start:start + self.CHUNK])
            self.states += [states[i, : int(mask[i].sum())].float().clone() for i in range(states.shape[0])]
        tmp = cache_file.with_suffix(".tmp")
        save_file({str(i): s.contiguous().cpu() for i, s in enumerate(self.states)}, tmp)
        listing.write_text(json.dumps(ordered) + "\n")
        tmp.replace(cache_file)

    def batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        rows = [self.states[self.index[c]] for c in captions]
        lengths = [r.shape[0] for r in rows]
        L = -(-max(lengths) // 8) * 8
        out = torch.zeros(len(rows), L, rows[0].shape[1], device=rows[0].device)
        mask = torch.zeros(len(rows), L, dtype=torch.bool, device=out.device)
        for i, r in enumerate(rows):
            out[i, : lengths[i]] = r
            mask[i, : lengths[i]] = True
        return out, (None if bool(mask.all()) else mask)


class Trainer:
    # Set from a signal handler (`nucleus train` on Ctrl-C / SIGTERM): the loop saves and returns between steps.
    stop_requested = False

    def __init__(self, cfg: TrainConfig, data_dir: str | Path, run_dir: str | Path, max_steps: int | None = None,
                 resume: bool = False, progress: bool = True):
        cfg.validate()
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.total_steps = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
        if self.total_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {max_steps}")
        self._check_run_dir(resume)
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                                   "cpu" if cfg.device == "auto" else cfg.device)
        if self.device.type == "cpu" and cfg.cpu_threads > 0:
            torch.set_num_threads(cfg.cpu_threads)
        self.autocast = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and self.device.type == "cuda")

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        random.seed(cfg.seed)
        self.generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.np_rng = np.random.default_rng(cfg.seed)

        self.data_dir = Path(data_dir)
        self._load_data()
        self.model = NucleusTransformer(cfg.model).to(self.device)
        if cfg.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.router_gates = [m.gate.weight for m in self.model.modules() if isinstance(m, MoELayer)]
        self.text_encoder, self.autoencoder = build_encoders(cfg, self.device)
        drawable = [c for caps in self.row_captions for c, w in zip(caps, self._caption_weights(len(caps))) if w > 0]
        self.captions = CaptionCache(self.text_encoder, drawable, self.run_dir / "text_states.safetensors", progress)
        ns_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.muon, self.adamw, self.groups = build_optimizers(
            self.model, cfg.lr, cfg.weight_decay, cfg.adam_betas, cfg.adam_eps, cfg.muon_momentum,
            cfg.muon_nesterov, cfg.muon_ns_steps, ns_dtype)
        self.optimizers = {"muon": self.muon, "adamw": self.adamw}

        # Written once everything above was accepted, so a refused start leaves no run behind.
        self.cfg.save_json(self.run_dir / "train_config.json")
        self.step, self.losses, self.nonfinite, self.nonfinite_in_a_row = 0, [], 0, 0
        self.stage_index = -1
        if resume:
            latest = ckpt.latest_checkpoint(self.run_dir)
            if latest is not None:
                state = ckpt.load_checkpoint(latest, self.model, self.optimizers, self.generator, self.np_rng)
                self.step, self.losses = state["step"], state["losses"]
                self.nonfinite, self.nonfinite_in_a_row = state["nonfinite"], state["nonfinite_in_a_row"]
                print(f"resumed from {latest} at step {self.step}")

    # ---- setup ---------------------------------------------------------------------------------------------
    def _check_run_dir(self, resume: bool) -> None:
        config_file = self.run_dir / "train_config.json"
        if config_file.exists():
            if not resume:
                raise ValueError(f"run folder {str(self.run_dir)!r} already holds a run; pass --resume to continue it "
                                 f"or choose a new --out")
            saved = json.loads(config_file.read_text())
            diff = sorted(k for k in saved if saved[k] != self.cfg.to_dict().get(k))
            if diff:
                raise ValueError(f"--resume with a different config than {config_file}: fields {diff} differ")
        self.run_dir.mkdir(parents=True, exist_ok=True)

    def _load_data(self) -> None:
        table = read_manifest(self.data_dir)
        if table.num_rows == 0:
            raise ValueError(f"the manifest in {str(self.data_dir)!r} has no rows")
        root = latest_version_dir(self.data_dir).parent
        paths = [Path(p) if Path(p).is_absolute() else root / p for p in table.column("image_path").to_pylist()]
        self.images = ImageCache(paths)
        self.widths = table.column("width").to_numpy()
        self.heights = table.column("height").to_numpy()
        self.tiers = table.column("tier").to_numpy().astype(np.int64)
        self.buckets = table.column("bucket").to_numpy().astype(np.int64)
        self.row_captions = table.column("captions").to_pylist()
        empty = [i for i, c in enumerate(self.row_captions) if not c]
        if empty:
            raise ValueError(f"{len(empty)} manifest rows have no captions (first: row {empty[0]})")
        # Unreadable images are found up front (a header check) and never drawn, so sampling stays a function
        # of the seed whatever a run happens to touch first.
        self.readable = np.array([readable_image(p) for p in paths])
        if not self.readable.all():
            bad = np.flatnonzero(~self.readable)
            print(f"skipping {len(bad)} unreadable images (first: {paths[bad[0]]})")
            if len(bad) == len(paths):
                raise ValueError(f"no readable image in {str(self.data_dir)!r}")

    def _caption_weights(self, n: int) -> tuple[float, ...]:
        return caption_probabilities(self.cfg.caption_weights, n)

    def _enter_stage(self, index: int) -> None:
        stage = self.cfg.stages[index]
        granularity = self.autoencoder.scale_factor * self.cfg.model.patch_size
        self.aspect_buckets = make_buckets(stage.resolution, stage.aspect_ratios, granularity)
        self.bucket_of_row = assign_buckets(self.widths, self.heights, self.aspect_buckets)
        self.weights = row_weights(self.tiers, self.buckets, stage) * self.readable
        self.model.set_capacity_factors(stage.capacity_factors or self.cfg.model.capacity_factors)
        self.stage_index = index
        sizes = ", ".join(f"{b.ratio} {b.width}x{b.height}" for b in self.aspect_buckets)
        shares = ", ".join(f"B{b}:{s:.2f}" for b, s in share_by_bucket(self.weights, self.buckets).items())
        print(f"stage {stage.name}: {stage.steps} steps, batch {stage.batch_size}, buckets [{sizes}], "
              f"capacity factors {list(self.model.config.capacity_factors)}, sampling shares [{shares}]")

    # ---- one step ------------------------------------------------------------------------------------------
    def _batch(self, batch_size: int):
        bucket_idx, rows = draw_batch(self.np_rng, self.bucket_of_row, self.weights, len(self.aspect_buckets), batch_size)
        bucket = self.aspect_buckets[bucket_idx]
        captions = [pick_caption(self.np_rng, self.row_captions[r], self.cfg.caption_weights, self.cfg.caption_dropout)
                    for r in rows]
        images = self.images.batch(rows, bucket).to(self.device)
        with torch.no_grad():
            latents = self.autoencoder.encode(images)
        return latents, captions

    def _train_step(self, batch_size: int, wavelet_weight: float = 0.0) -> tuple[float, float, dict | None, bool]:
        """(loss, grad norm, routing stats or None, whether the update was applied)."""
        cfg, patch = self.cfg, self.cfg.model.patch_size
        latents, captions = self._batch(batch_size)
        B, _, h, w = latents.shape
        x0 = pack_latents(latents, patch)
        S = x0.shape[1]
        text, text_mask = self.captions.batch(captions)
        noise = torch.randn(x0.shape, generator=self.generator, device=self.device, dtype=x0.dtype)
        sigma = sample_sigmas(B, S, cfg.timesteps, self.generator)
        x_t = noisy_latents(x0, noise, sigma)

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(hidden_states=x_t, img_shapes=[(1, h // patch, w // patch)] * B, encoder_hidden_states=text,
                             encoder_hidden_states_mask=text_mask, timestep=sigma, return_routing=True)
        loss = flow_loss(out.sample, x0, noise)
        if cfg.z_loss_weight:
            loss = loss + cfg.z_loss_weight * router_z_loss(out.router_logits)
        if cfg.orthogonality_weight and self.router_gates:
            loss = loss + cfg.orthogonality_weight * router_orthogonality_loss(self.router_gates)
        if wavelet_weight:
            loss = loss + wavelet_weight * wavelet_loss(out.sample, x0, noise, h, w, patch, cfg.wavelet_levels)
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            return loss_value, float("nan"), None, False
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
        if not math.isfinite(grad_norm):
            return loss_value, grad_norm, None, False
        set_lr((self.muon, self.adamw), wsm_lr(self.step, cfg.lr, cfg.warmup_steps))
        self.muon.step()
        self.adamw.step()
        stats = routing_stats(out.router_logits, out.expert_indices, S) if self._due(cfg.log_every) else None
        return loss_value, grad_norm, stats, True

    def _due(self, every: int) -> bool:
        return every > 0 and (self.step + 1) % every == 0

    # ---- the loop ------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.cfg
        print(describe_groups(self.groups))
        logger = RunLogger(self.run_dir)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="train", unit="step",
                   dynamic_ncols=True)
        images_seen, t0 = 0, time.perf_counter()
        try:
            while self.step < self.total_steps:
                if self.stop_requested:
                    latest = ckpt.latest_checkpoint(self.run_dir)
                    if latest is None or latest.name != f"step-{self.step:08d}":
                        self._save()
                        ckpt.mark_interrupted(ckpt.latest_checkpoint(self.run_dir))
                    return TrainResult(self.run_dir, self.step, list(self.losses), self.nonfinite, 0.0)
                index, stage = cfg.stage_at(self.step)
                if index != self.stage_index:
                    self._enter_stage(index)
                for opt in self.optimizers.values():
                    opt.zero_grad(set_to_none=True)
                loss, grad_norm, stats, applied = self._train_step(stage.batch_size, stage.wavelet_weight)
                self._account(loss, applied)
                images_seen += stage.batch_size
                ips = images_seen / max(time.perf_counter() - t0, 1e-9)
                lr = wsm_lr(self.step, cfg.lr, cfg.warmup_steps)
                if self._due(cfg.log_every):
                    logger.scalars(self.step + 1, loss, lr, grad_norm, ips, self.nonfinite, stats)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}", stage=stage.name)
                bar.update(1)
                self.step += 1
                if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps:
                    self._save()
                if (cfg.sample_every and self.step % cfg.sample_every == 0) or self.step == self.total_steps:
                    grid = self.sample_grid(self.run_dir / "samples" / f"step-{self.step:08d}.png")
                    logger.sample_grid(self.step, grid)
        finally:
            bar.close()
            logger.close()
        logger.loss_curve(self.losses, self.run_dir / "loss_curve.png")
        (self.run_dir / "losses.json").write_text(json.dumps(self.losses) + "\n")
        ips = images_seen / max(time.perf_counter() - t0, 1e-9)
        print(f"done: {self.step} steps, final loss {self.losses[-1]:.4f}, {ips:.1f} images/s, "
              f"{self.nonfinite} non-finite steps skipped; run folder {self.run_dir}")
        return TrainResult(self.run_dir, self.step, list(self.losses), self.nonfinite, ips)

    def _account(self, loss: float, applied: bool) -> None:
        """Record the loss; a step whose loss or gradient was not finite was skipped: count it, and stop after
        too many in a row (the checkpoints on disk are all from good steps)."""
        self.losses.append(loss)
        if applied:
            self.nonfinite_in_a_row = 0
            return
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        self.nonfinite += 1
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_in_a_row:
            last = ckpt.latest_checkpoint(self.run_dir)
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.step} (limit "
                f"max_nonfinite_in_a_row={self.cfg.max_nonfinite_in_a_row}); stopping. The last good checkpoint is "
                f"{last if last else 'none (no checkpoint written yet)'}; lower lr or check the data, then --resume")

    def _save(self) -> None:
        state = {"losses": self.losses, "nonfinite": self.nonfinite, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                 "sampler": {"kind": "numpy-pcg64", "batches_drawn": self.step}}
        ckpt.save_checkpoint(self.run_dir, self.step, self.model, self.model.config.to_dict(), self.optimizers,
                             self.generator, self.np_rng, state, self.cfg.keep_last)

    # ---- samples -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, path: Path) -> Path:
        """The fixed sample prompts at fixed seeds from the current weights, at the current stage's resolution."""
        stage = self.cfg.stages[max(self.stage_index, 0)]
        was_training = self.model.training
        self.model.eval()
        try:
            pipe = make_pipeline(self.model, self.text_encoder, self.autoencoder, self.cfg.timesteps, stage.resolution)
            return sample_grid(pipe, list(self.cfg.sample_prompts), self.cfg.sample_seed, self.cfg.sample_steps,
                               self.cfg.sample_guidance, path)
        finally:
            self.model.train(was_training)
