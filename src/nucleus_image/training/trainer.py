"""The training loop: stages of aspect-bucketed batches through the rectified-flow objective, Muon + AdamW under
Warmup-Stable-Merge, atomic checkpoints with exact resume, TensorBoard scalars, sample grids and a loss curve.
Baselines by config: AdamW alone (`optimizer.kind`), a cosine decay (`optimizer.schedule`), an EMA of the weights
(`ema_decay`, `ema.WeightEMA`, updated after each step and saved with each checkpoint).

    nucleus train --preset tiny --data data/synth --out runs/tiny [--max-steps N] [--resume] [--set optimizer.lr=3e-3]

The run is built from the parts in `build.py` (process group, data, encoders and caption cache, model, optimizers,
resume); each step is `step.train_step` with the `loss.FlowObjective`; its progress is a `state.TrainState`.

No step reads a tensor back to the host: losses, gradient norms and non-finite flags stay on the device until a
logging step (every `log_every`) or a checkpoint reads all of them at once; the Ctrl-C agreement between processes
is a vote on the host (`parallel.collectives.StopVote`); the routing statistics are computed on the device.

Exact resume: step k's batch is a pure function of (seed, k) (`data_loader.BatchPlan`), each sample's noise and
sigma of (seed, k, its row in the global batch) (`noise.row_noise`, so every process draws only its own rows and
any layout trains on the numbers one process would), and text states are encoded one caption at a time into a
cache shared across runs (`data.text_states`), so a caption's states never depend on when (or beside what) it was
first encoded. A run killed and resumed therefore reproduces the straight run's losses and weights bit for bit on
CPU.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ..model.latents import pack_latents
from ..model.moe import MoELayer
from ..progress import progress as progress_bar
from ..timing import PhaseTimer
from . import checkpoint as ckpt
from .alignment import build_alignment, check_annotations
from .binding import binding_targets, build_binding
from .build import (
    build_model,
    build_parallel,
    build_text_states,
    check_run_dir,
    data_record,
    resolve_device,
    resume_latest,
    seed_everything,
)
from .config import TrainConfig
from .curriculum import share_by_bucket
from .data_loader import BatchPlan, RankBatches, rank_loader, rank_rows, read_rows
from .ema import WeightEMA
from .loss import FlowBatch, FlowObjective, contrastive_negatives, decorrelate_router_rows_
from .monitor import RunLogger, routing_table
from .noise import row_noise
from .optim import build_optimizers, describe_groups
from .sampling import make_pipeline, sample_grid
from .schedule import lr_at
from .state import NonFiniteLossError, TrainState
from .step import StepOutput, train_step

__all__ = ["NonFiniteLossError", "TrainResult", "Trainer"]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    losses: list[float]
    nonfinite_skipped: int
    images_per_second: float


class Trainer:
    # Set from a signal handler (`nucleus train` on Ctrl-C / SIGTERM): the loop saves and returns between steps.
    stop_requested = False

    def __init__(
        self,
        cfg: TrainConfig,
        data_dir: str | Path,
        run_dir: str | Path,
        max_steps: int | None = None,
        resume: bool = False,
        progress: bool = True,
    ):
        cfg.validate()
        self.started = time.perf_counter()  # the time guard's budget counts start-up (caption encoding) too
        self.timer = PhaseTimer()  # where the time goes (RUN/timing.json): setup, caption encoding, the step's parts
        self.cfg, self.run_dir, self.max_steps = cfg, Path(run_dir), max_steps
        self.total_steps = cfg.total_steps if max_steps is None else min(cfg.total_steps, max_steps)
        if self.total_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {max_steps}")
        # The layout is checked before any work; a run may change its layout on resume (checkpoints reshard).
        self.dims = build_parallel(cfg, resolve_device(cfg.device))
        self.device = self.dims.device if self.dims else resolve_device(cfg.device)
        if cfg.ema_decay and self.dims is not None:
            raise ValueError(
                f"ema_decay={cfg.ema_decay} needs a one-process run (the EMA is saved beside one process's weights); "
                f"this layout has {self.dims.world} processes: train in one, or use ema_decay=0 and nucleus merge"
            )
        self.is_main = self.dims is None or self.dims.is_main
        self.rank, self.world_size = (self.dims.rank, self.dims.world) if self.dims else (0, 1)
        self.progress = progress and self.is_main
        check_run_dir(self.run_dir, cfg, resume, self.is_main)
        self._barrier()  # every rank has seen the folder as it was before rank 0 writes into it
        if self.device.type == "cpu" and cfg.cpu_threads > 0:
            torch.set_num_threads(cfg.cpu_threads)
        self.autocast = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and self.device.type == "cuda")

        seed_everything(cfg.seed)
        self.state = TrainState()
        self.data_dir = Path(data_dir)
        self.rows = read_rows(self.data_dir)
        for option in ("alignment_weight", "binding_weight"):
            if getattr(cfg, option):
                check_annotations(self.rows.annotations, option)
        self.data_record = data_record(self.data_dir, self.rows, self.run_dir, resume)
        # Encoders and captions first, so a run they cannot serve fails before the (possibly huge) model exists.
        with self.timer.phase("caption encoding"):
            self.text_states, self.autoencoder = build_text_states(
                cfg, self.rows, self.device, self.is_main, self.progress, self._barrier
            )
        self.model = build_model(cfg, self.dims, self.device, self.autocast)
        # Collected after sharding: FSDP2 replaces the Parameters.
        self.router_gates = [m.gate.weight for m in self.model.modules() if isinstance(m, MoELayer)]
        self.plan = BatchPlan(cfg, self.rows, self.autoencoder.scale_factor * cfg.model.patch_size)
        self._batches = self._dataset = None
        ns_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.muon, self.adamw, self.groups = build_optimizers(self.model, cfg.optimizer, ns_dtype)
        self.optimizers = {k: o for k, o in (("muon", self.muon), ("adamw", self.adamw)) if o is not None}
        # The EMA starts at the initial weights (a resume below restores the checkpoint's average into it).
        self.state.ema = WeightEMA(self.model, cfg.ema_decay) if cfg.ema_decay else None
        # The alignment head: outside the model, with its own optimizer; the state saves both beside the model.
        self.alignment = None
        built = build_alignment(cfg, self.model, self.device, self.dims)
        if built is not None:
            self.alignment, self.state.heads_optimizer = built
            self.state.heads = self.alignment.head
        # The binding loss: taps on blocks' attention (nothing to train or save besides the model).
        self.binding, self.caption_words = build_binding(cfg, self.model) or (None, None)
        # The step's loss function; each step sets its stage's wavelet weight and whether routing is logged.
        self.objective = FlowObjective(
            cfg.model.patch_size,
            cfg.z_loss_weight,
            0.0,
            cfg.wavelet_levels,
            self.autocast,
            contrastive_weight=cfg.contrastive_weight,
            load_balance_weight=cfg.load_balance_weight,
            load_balance_top_k=cfg.model.router_top_k,
            alignment=self.alignment,
            binding=self.binding,
        )
        self.timer.add("setup", time.perf_counter() - self.started - self.timer.seconds["caption encoding"])

        # Written once everything above was accepted, so a refused start leaves no run behind.
        if self.is_main:
            self.cfg.save_json(self.run_dir / "train_config.json")
            (self.run_dir / "data.json").write_text(json.dumps(self.data_record, indent=1) + "\n")
        self.stage_index = -1
        self.resumed = False
        if resume:
            latest = resume_latest(self.run_dir, self.model, self.optimizers, self.state, self.dims is not None)
            if latest is not None:
                self.resumed = True
                self._print(f"resumed from {latest} at step {self.step}")

    # The run's progress lives in its TrainState (what checkpoints save); these read it.
    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    @property
    def losses(self) -> list[float]:
        return self.state.losses

    @property
    def nonfinite(self) -> int:
        return self.state.nonfinite

    # ---- setup ---------------------------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.dims:
            from ..parallel.collectives import barrier

            barrier(self.dims)

    def _print(self, text: str) -> None:
        if self.is_main:
            print(text)

    def _enter_stage(self, index: int) -> None:
        stage = self.cfg.stages[index]
        data = self.plan.stage(index)
        self.aspect_buckets, self.weights = data.aspect_buckets, data.weights
        self.model.set_capacity_factors(stage.capacity_factors or self.cfg.model.capacity_factors)
        self.stage_index = index
        sizes = ", ".join(f"{b.ratio} {b.width}x{b.height}" for b in self.aspect_buckets)
        shares = ", ".join(f"B{b}:{s:.2f}" for b, s in share_by_bucket(self.weights, self.rows.buckets).items())
        self._print(
            f"stage {stage.name}: {stage.steps} steps, batch {stage.batch_size}, buckets [{sizes}], "
            f"capacity factors {list(self.model.config.capacity_factors)}, sampling shares [{shares}]"
        )

    # ---- one step ------------------------------------------------------------------------------------------
    def _local_rows(self, batch_size: int) -> np.ndarray:
        """Which rows of the global batch this process trains on: its contiguous share of each micro-batch.
        Every rank draws the same global batch (same bucket, so the same sequence length for the all-to-all)."""
        return rank_rows(batch_size, self.rank, self.world_size, self.cfg.grad_accum_steps)

    def _start_loader(self):
        """The data loader from the current step on (host work: it seeds its workers from a CPU generator)."""
        if self._dataset is None:  # kept across loader restarts: its in-memory images stay decoded
            self._dataset = RankBatches(
                self.plan,
                self.rank,
                self.world_size,
                self.cfg.grad_accum_steps,
                self.text_states,
                self.cfg.image_cache_mb,
            )
        return iter(
            rank_loader(
                self.plan,
                self.rank,
                self.world_size,
                self.step,
                self.total_steps,
                self.cfg.data_workers,
                self.cfg.grad_accum_steps,
                pin_memory=self.device.type == "cuda",
                dataset=self._dataset,
            )
        )

    def _batch(self, batch_size: int):
        """Latents, per micro-batch text states and mask, and the loader's item (captions, and the maps the
        alignment head and binding loss need) of this process's rows of the step's global batch (all of it in one
        process), prepared ahead by the data workers."""
        if self._batches is None:  # started lazily, at the step a run starts or resumes from
            self._batches = self._start_loader()
        item = next(self._batches)
        if item["step"] != self.step or len(item["captions"]) * self.world_size != batch_size:
            raise RuntimeError(
                f"data loader out of step: got step {item['step']} with {len(item['captions'])} rows "
                f"at step {self.step} (batch {batch_size} over {self.world_size} processes)"
            )
        images = item["images"].to(self.device, non_blocking=True).float() / 127.5 - 1.0
        with torch.no_grad():
            latents = self.autoencoder.encode(images)
        texts = [
            (
                states.to(self.device, non_blocking=True),
                None if mask is None else mask.to(self.device, non_blocking=True),
            )
            for states, mask in item["texts"]
        ]
        return latents, texts, item

    def _micro_batches(self, batch_size: int) -> list[FlowBatch]:
        """This process's rows of the step's global batch as `grad_accum_steps` micro-batches, with the noise and
        sigmas of those rows only."""
        latents, texts, item = self._batch(batch_size)
        captions = item["captions"]
        targets = item["targets"].to(self.device, non_blocking=True) if "targets" in item else None
        _, _, h, w = latents.shape
        x0 = pack_latents(latents, self.cfg.model.patch_size)
        noise, sigma = row_noise(
            self.cfg.seed,
            self.step,
            self._local_rows(batch_size),
            tuple(x0.shape[1:]),
            self.cfg.timesteps,
            self.device,
            x0.dtype,
        )
        B = x0.shape[0] // len(texts)
        batches = []
        for m, (text, mask) in enumerate(texts):
            part = slice(m * B, (m + 1) * B)
            negatives = contrastive_negatives(captions[part], self.device) if self.cfg.contrastive_weight else None
            bound = None
            if self.binding is not None:
                cover, named = binding_targets(
                    self.caption_words, captions[part], item["shapes"][part], item["coverage"][part], text.shape[1]
                )
                bound = (cover.to(self.device, non_blocking=True), named.to(self.device, non_blocking=True))
            batches.append(
                FlowBatch(
                    x0[part],
                    noise[part],
                    sigma[part],
                    text,
                    mask,
                    (h, w),
                    negatives,
                    None if targets is None else targets[part],
                    bound,
                )
            )
        return batches

    def _train_step(self, stage) -> StepOutput:
        """One step of the stage, recorded in the run's state (nothing read back)."""
        cfg = self.cfg
        objective = replace(self.objective, wavelet_weight=stage.wavelet_weight, routing_stats=self._due(cfg.log_every))
        optimizers = list(self.optimizers.values()) + ([self.state.heads_optimizer] if self.alignment else [])
        self.timer.mark()
        micro_batches = self._micro_batches(stage.batch_size)
        self.timer.lap("data")
        out = train_step(
            self.model,
            optimizers,
            micro_batches,
            objective,
            cfg.optimizer,
            self.step,
            dims=self.dims,
            timer=self.timer,
            total_steps=self.total_steps,  # what a cosine decays over: the time guard may re-plan it
        )
        if cfg.orthogonality_step and self.router_gates:
            self._decorrelate_routers(cfg.orthogonality_step, out.applied)
        if self.state.ema is not None:  # after every change the step makes to the weights
            self.state.ema.update(out.applied)
        self.timer.lap("optimizer")
        self.state.record(out.loss, out.applied, out.grad_norm)
        return out

    @torch.no_grad()
    def _decorrelate_routers(self, step: float, applied: torch.Tensor) -> None:
        """The orthogonality step on whole router matrices, after an applied update only (a masked update: the
        decision stays on the device). A sharded gate is gathered, updated identically on every rank, and each
        rank keeps its own shard of the result (no second communication)."""
        for g in self.router_gates:
            full = g.full_tensor() if isinstance(g, DTensor) else g.detach()
            moved = full.clone()
            decorrelate_router_rows_([moved], step)
            kept = torch.where(applied, moved, full)
            if isinstance(g, DTensor):
                g.copy_(distribute_tensor(kept, g.device_mesh, g.placements, src_data_rank=None))
            else:
                g.copy_(kept)

    def _stop_agreed(self, vote) -> bool:
        """Whether to stop at this step boundary: an interrupt seen by any process stops all of them at the same
        boundary, so they save the same step together (a host vote, read one step later; one process just reads
        its flag)."""
        if vote is not None and vote.poll(self.stop_requested):
            self.stop_requested = True
            return True
        return vote is None and self.stop_requested

    def _mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if not self.dims:
            return value
        from ..parallel.collectives import mean_over_ranks

        return mean_over_ranks(value, self.dims)

    def _flush(self) -> None:
        """Read the steps recorded since the last flush back (losses averaged over processes)."""
        self.state.flush(
            self._mean_over_ranks, self.cfg.max_nonfinite_in_a_row, lambda: ckpt.latest_checkpoint(self.run_dir)
        )

    def _due(self, every: int) -> bool:
        """Whether the step about to run (self.step) is one of every `every`-th."""
        return every > 0 and (self.step + 1) % every == 0

    # ---- the loop ------------------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        cfg = self.cfg
        self._print(describe_groups(self.groups))
        if self.state.ema is not None:
            ema = self.state.ema
            self._print(
                f"EMA of the weights: decay {ema.decay}, {ema.numel:,} params in float32, "
                f"{ema.nbytes:,} bytes ({ema.nbytes / 2**20:.1f} MiB) beside the weights"
            )
        logger = RunLogger(self.run_dir) if self.is_main else None
        bar = progress_bar(
            total=self.total_steps, initial=self.step, disable=not self.progress, desc="train", unit="step"
        )
        vote = None
        if self.dims:
            from ..parallel.collectives import StopVote

            vote = StopVote(self.dims)
        images_seen, t0 = 0, time.perf_counter()
        try:
            while self.step < self.total_steps:
                if self._stop_agreed(vote):
                    latest = ckpt.latest_checkpoint(self.run_dir)
                    if latest is None or latest.name != f"step-{self.step:08d}":
                        self._save()
                        if self.is_main:
                            ckpt.mark_interrupted(ckpt.latest_checkpoint(self.run_dir))
                    return TrainResult(self.run_dir, self.step, list(self.losses), self.nonfinite, 0.0)
                index, stage = cfg.stage_at(self.step)
                if index != self.stage_index:
                    self._enter_stage(index)
                    stage_start = self.step
                logging = self._due(cfg.log_every)
                out = self._train_step(stage)
                images_seen += stage.batch_size
                ips = images_seen / max(time.perf_counter() - t0, 1e-9)
                if logging:
                    self._log_step(out, logger, bar, stage.name, ips)
                bar.update(1)
                if cfg.time_budget_s and not self.resumed:
                    if self.step == stage_start + self.GUARD_SKIP:
                        timed_from = (self.step, time.perf_counter())
                    elif self.step > stage_start + self.GUARD_SKIP:
                        self._fit_to_budget(self.step - timed_from[0], time.perf_counter() - timed_from[1])
                        bar.total = self.total_steps
                with self.timer.phase("checkpoints and samples"):
                    if self.step % cfg.checkpoint_every == 0 or self.step == self.total_steps:
                        self._save()
                    if (cfg.sample_every and self.step % cfg.sample_every == 0) or self.step == self.total_steps:
                        grid = self.sample_grid(self.run_dir / "samples" / f"step-{self.step:08d}.png")
                        if logger:  # rank 0 of several, or the only process
                            logger.sample_grid(self.step, grid)
        finally:
            if vote is not None:
                self.stop_requested = vote.close() or self.stop_requested
            bar.close()
            if logger:
                logger.close()
        ips = images_seen / max(time.perf_counter() - t0, 1e-9)
        if not logger:
            return TrainResult(self.run_dir, self.step, list(self.losses), self.nonfinite, ips)
        logger.loss_curve(self.losses, self.run_dir / "loss_curve.png")
        (self.run_dir / "losses.json").write_text(json.dumps(self.losses) + "\n")
        self.timer.add(
            "loop (logging, progress, rest)",
            time.perf_counter()
            - t0
            - sum(v for k, v in self.timer.seconds.items() if k not in ("setup", "caption encoding")),
        )
        self.timer.write(
            self.run_dir / "timing.json",
            steps=self.step,
            images=images_seen,
            device=self.device.type,
            ema_bytes=0 if self.state.ema is None else self.state.ema.nbytes,
        )
        print(
            f"done: {self.step} steps, final loss {self.losses[-1]:.4f}, {ips:.1f} images/s, "
            f"{self.nonfinite} non-finite steps skipped; run folder {self.run_dir}"
        )
        return TrainResult(self.run_dir, self.step, list(self.losses), self.nonfinite, ips)

    def _log_step(self, out: StepOutput, logger: RunLogger | None, bar, stage: str, ips: float) -> None:
        """A logging step: the recorded steps read back, TensorBoard scalars (loss and gradient norm of this step,
        routing statistics and the loss function's other terms averaged over processes), the progress bar's loss."""
        self._flush()
        routing = out.logged.get("routing")
        routing = None if routing is None else routing_table(self._mean_over_ranks(routing))
        extra = {k: float(self._mean_over_ranks(v.double())) for k, v in out.logged.items() if k != "routing"}
        if logger:
            lr = lr_at(self.cfg.optimizer, self.step - 1, self.total_steps)
            logger.scalars(
                self.step, self.losses[-1], lr, self.state.grad_norms[-1], ips, self.nonfinite, routing, extra
            )
        bar.set_postfix(loss=f"{self.losses[-1]:.4f}", img_s=f"{ips:.1f}", stage=stage)

    GUARD_SKIP = 3  # a stage's first steps (allocations, first batches) are not timed

    def _fit_to_budget(self, timed_steps: int, timed_seconds: float) -> None:
        """The time guard: after 5 and 20 timed steps of each stage, and every 100 steps after that, rescale the
        steps left (this stage's and every later stage's, by one factor) so the run ends within `time_budget_s`
        of its start. Later stages' step times are guessed as this stage's scaled by pixels per batch (small
        models cost less than that, so each stage is re-timed after its first 5 steps). The rescaled stages
        are printed and written to train_config.json, so `nucleus merge` sees the stages as trained."""
        if timed_steps not in (5, 20) and timed_steps % 100:
            return
        cfg = self.cfg
        index, stage = cfg.stage_at(self.step)
        done = self.step - sum(s.steps for s in cfg.stages[:index])
        if done == 0:  # the stage just ended: the next one is timed on its own
            return
        per_step = timed_seconds / timed_steps
        pixels = stage.resolution**2 * stage.batch_size
        planned = (stage.steps - done) * per_step + sum(
            s.steps * per_step * s.resolution**2 * s.batch_size / pixels for s in cfg.stages[index + 1 :]
        )
        left = 0.98 * cfg.time_budget_s - (time.perf_counter() - self.started)  # 2% for the final save and grid
        factor = min(max(left, 0.0) / max(planned, 1e-9), 4.0)
        before = [s.steps for s in cfg.stages]
        stage.steps = done + max(1, round(factor * (stage.steps - done)))
        for s in cfg.stages[index + 1 :]:
            s.steps = max(1, round(factor * s.steps))
        self.total_steps = cfg.total_steps if self.max_steps is None else min(cfg.total_steps, self.max_steps)
        self._batches = None  # the loader's workers planned batches with the old stage lengths: restart it here
        plan = ", ".join(f"{s.name} {b}->{s.steps}" for s, b in zip(cfg.stages, before))
        print(
            f"time guard: {per_step:.3f} s/step in {stage.name} (last {timed_steps} steps); "
            f"{time.perf_counter() - self.started:.0f} of {cfg.time_budget_s:.0f} s used; steps {plan}"
        )
        cfg.save_json(self.run_dir / "train_config.json")

    def _save(self) -> None:
        self._flush()
        self.state.data = {
            "kind": "batch-plan",
            "seed": self.cfg.seed,
            "next_step": self.step,
            "rank": self.rank,
            "world_size": self.world_size,
        }
        if self.dims:
            ckpt.save_distributed(
                self.run_dir,
                self.model,
                self.model.config.to_dict(),
                self.optimizers,
                self.state,
                self.cfg.keep_last,
                self.dims,
            )
        else:
            ckpt.save_checkpoint(
                self.run_dir, self.model, self.model.config.to_dict(), self.optimizers, self.state, self.cfg.keep_last
            )

    # ---- samples -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, path: Path) -> Path:
        """The fixed sample prompts at fixed seeds from the current weights, at the current stage's resolution,
        their text states read from the cache. Several processes all run the sampler on the sharded model with the
        same inputs (each holds its shards only, as in training) and rank 0 writes the grid."""
        stage = self.cfg.stages[max(self.stage_index, 0)]
        was_training = self.model.training
        self.model.eval()
        try:
            pipe = make_pipeline(self.model, None, self.autoencoder, self.cfg.timesteps, stage.resolution)
            return sample_grid(
                pipe,
                list(self.cfg.sample_prompts),
                self._prompt_states,
                self.cfg.sample_seed,
                self.cfg.sample_steps,
                self.cfg.sample_guidance,
                path,
                write=self.is_main,
            )
        finally:
            self.model.train(was_training)

    def _prompt_states(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        from ..data.text_states import pad_states

        states, mask = pad_states([self.text_states.get(prompt)])
        return states.to(self.device), None if mask is None else mask.to(self.device)
