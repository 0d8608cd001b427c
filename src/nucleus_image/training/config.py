"""Typed training configuration: a TrainConfig holding the recipe's knobs and a list of StageConfigs (the
256 -> 512 -> 1024 curriculum, scaled to the domain), named presets, `--set key=value` overrides, and the
resolved config written into every run folder.

    cfg = TrainConfig.preset("tiny").override(["optimizer.lr=3e-3", "stages.0.steps=100", "model.num_experts=16"])
    cfg.save_json(run_dir / "train_config.json")

The optimizer is one nested section (`OptimizerConfig`), shared with fine-tuning. Files and `--set` assignments
written before it existed name its fields flat (`lr`, `adam_betas`, `optimizer=adamw`, ...): those names are
read as aliases of the nested keys (`LEGACY_OPTIMIZER_KEYS`), so old run folders load and resume.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..model.config import NucleusConfig
from ..parallel.config import ParallelConfig


@dataclass
class TimestepConfig:
    """Logit-normal sigma sampling with a resolution-dependent mean, mixed with a uniform share.

    mu moves linearly in the image token count from mu_min at seq_min tokens to mu_max at seq_max tokens, the
    same line the released scheduler's `calculate_shift` draws (0.5 @ 256 -> 1.15 @ 4096)."""

    mu_min: float = 0.5
    mu_max: float = 1.15
    seq_min: int = 256
    seq_max: int = 4096
    std: float = 1.0
    uniform_share: float = 0.1


@dataclass
class OptimizerConfig:
    """The optimizer of a run: "muon" is Muon for the hidden matrices and AdamW for the rest (the recipe), "adamw"
    AdamW for everything (a baseline: every parameter at `lr`, weight decay on the matrices only, as the recipe's
    AdamW groups). Muon's update RMS is matched to AdamW's, so one learning rate serves both groups.

    `schedule`: "wsm" (the recipe, Warmup-Stable-Merge: linear warmup over `warmup_steps`, then constant) or
    "cosine" (a baseline: the same warmup, then a cosine decay to `min_lr_ratio * lr` at the run's last step);
    `schedule.lr_at`."""

    kind: str = "muon"
    lr: float = 1e-4
    warmup_steps: int = 1000
    schedule: str = "wsm"
    min_lr_ratio: float = 0.1  # "cosine": the learning rate at the last step, as a share of lr
    weight_decay: float = 0.0  # matrices only
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW
    eps: float = 1e-8  # AdamW
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    grad_clip: float = 1.0  # the global gradient norm is clipped to this

    def errors(self) -> list[str]:
        out = []
        if self.kind not in ("muon", "adamw"):
            out.append(f"optimizer.kind {self.kind!r}; accepted: muon, adamw")
        if self.schedule not in ("wsm", "cosine"):
            out.append(f"optimizer.schedule {self.schedule!r}; accepted: wsm, cosine")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            out.append(f"optimizer.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            out.append(
                f"optimizer needs lr > 0, warmup_steps >= 0, weight_decay >= 0 and grad_clip > 0; got "
                f"lr={self.lr}, warmup_steps={self.warmup_steps}, weight_decay={self.weight_decay}, "
                f"grad_clip={self.grad_clip}"
            )
        if not 0 <= self.muon_momentum < 1 or self.muon_ns_steps < 1:
            out.append(
                f"optimizer needs 0 <= muon_momentum < 1 and muon_ns_steps >= 1; got "
                f"muon_momentum={self.muon_momentum}, muon_ns_steps={self.muon_ns_steps}"
            )
        return out


# Flat names of the optimizer fields in configs written before the nested section, and in `--set` (aliases).
LEGACY_OPTIMIZER_KEYS = {
    "optimizer": "kind",
    "lr": "lr",
    "warmup_steps": "warmup_steps",
    "weight_decay": "weight_decay",
    "adam_betas": "betas",
    "adam_eps": "eps",
    "muon_momentum": "muon_momentum",
    "muon_nesterov": "muon_nesterov",
    "muon_ns_steps": "muon_ns_steps",
    "grad_clip": "grad_clip",
}


def nest_legacy_optimizer(data: dict) -> dict:
    """A config dict with flat optimizer fields (the old layout) moved into its `optimizer` section; a dict
    already nested is returned unchanged."""
    flat = {
        k: v for k, v in data.items() if k in LEGACY_OPTIMIZER_KEYS and not (k == "optimizer" and isinstance(v, dict))
    }
    if not flat:
        return data
    out = {k: v for k, v in data.items() if k not in flat}
    section = dict(out.get("optimizer") or {})
    section.update({LEGACY_OPTIMIZER_KEYS[k]: v for k, v in flat.items()})
    out["optimizer"] = section
    return out


@dataclass
class StageConfig:
    """One curriculum stage. `resolution` is the side of the square with the stage's pixel area; every aspect
    bucket keeps about that area. Sampling weights are indexed by manifest tier (1..5) and bucket (1..8);
    an empty tuple means uniform."""

    name: str
    steps: int
    resolution: int
    batch_size: int
    aspect_ratios: tuple[str, ...] = ("1:1",)
    capacity_factors: tuple[float, ...] = ()  # per layer; empty keeps the model config's
    tier_weights: tuple[float, ...] = ()
    bucket_weights: tuple[float, ...] = ()
    wavelet_weight: float = 0.0  # Haar detail loss on the velocity error (the recipe: 0.1 in the 1024 stage only)


@dataclass
class TrainConfig:
    model: NucleusConfig = field(default_factory=lambda: NucleusConfig.preset("tiny"))
    text_encoder: str = "minilm"  # "minilm" | "qwen3-vl" (from pipeline_dir) | "pipeline:DIR"
    autoencoder: str = "pixel"  # "pixel" | "qwen-image" (from pipeline_dir) | "pipeline:DIR"
    pipeline_dir: str = ""  # a diffusers Nucleus-Image folder the named encoders are read from
    stages: list[StageConfig] = field(default_factory=list)
    seed: int = 0
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    # Objective.
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)
    z_loss_weight: float = 5e-7
    # Switch-style load-balance loss over the tokens' top model.router_top_k experts (loss.load_balance_loss);
    # 0 = none. Meant for token choice, whose experts can overflow; with expert choice it balances preferences.
    load_balance_weight: float = 0.0
    orthogonality_step: float = 0.01  # router rows pushed apart after each step (loss.decorrelate_router_rows_)
    wavelet_levels: int = 2  # Haar levels of the stages' wavelet loss
    # Contrastive flow matching (loss.contrastive_flow_loss): lambda of the subtracted term; 0 = plain flow matching.
    contrastive_weight: float = 0.0
    # Alignment head (training/alignment.py): weight of its per-token shape/colour loss on block `alignment_block`'s
    # tokens; 0 = no head. Needs the synthetic domain's annotations.
    alignment_weight: float = 0.0
    alignment_block: int = 1
    # Binding loss (training/binding.py): weight of the loss that points the image-to-text attention of
    # `binding_blocks` from each object's tokens at its own caption words; 0 = none. Needs the annotations too.
    binding_weight: float = 0.0
    binding_blocks: tuple[int, ...] = (1,)
    caption_dropout: float = 0.1  # share of samples trained on the empty prompt, for classifier-free guidance
    caption_weights: tuple[float, ...] = ()  # over caption granularities, low to high quality; empty = uniform
    # Systems.
    parallel: ParallelConfig = field(default_factory=ParallelConfig)  # layout under torchrun / --nproc
    grad_accum_steps: int = 1  # micro-batches per optimizer step; a stage's batch_size stays the global batch
    mixed_precision: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "no"
    gradient_checkpointing: bool = False
    device: str = "auto"
    # CPU intra-op threads (0 = torch's default). Small models train faster on one thread: their matmuls are too
    # small to split, and on a busy machine two-thread barriers stall whenever either core is taken.
    cpu_threads: int = 0
    # Processes decoding images ahead of the training thread (0 = decode in the training process; same batches).
    data_workers: int = 1
    # Fitted images held in memory once decoded, up to this many MB (with data_workers=0; 0 = none).
    image_cache_mb: float = 0.0
    max_nonfinite_in_a_row: int = 5
    # Wall-clock budget of `nucleus train` in seconds (0 = none): the trainer times its first steps and rescales
    # the remaining steps of every stage to fit, re-planning as it goes; the plan is printed and the rescaled
    # stages are written to train_config.json (resume with --config that file).
    time_budget_s: float = 0.0
    # Checkpoints, logging and samples.
    checkpoint_every: int = 500
    keep_last: int = 16
    log_every: int = 10
    sample_every: int = 0  # 0 = only at the end
    sample_prompts: tuple[str, ...] = (
        "a red circle",
        "two blue squares",
        "a green triangle to the left of a yellow circle",
        "three purple stars",
    )
    sample_seed: int = 1234
    sample_steps: int = 20
    sample_guidance: float = 4.0
    # Merge (WSM): how `nucleus merge` and the demo combine the last checkpoints.
    merge_last: int = 8
    merge_weights: str = "inverse-sqrt"
    # An exponential moving average of the transformer's weights (a baseline to WSM's merge; 0 = none): after
    # every applied step ema = decay * ema + (1 - decay) * weights, in float32 beside the weights (4 bytes per
    # parameter), saved in each checkpoint (ema.safetensors); `nucleus merge RUN --ema` exports it.
    ema_decay: float = 0.0

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> tuple[int, StageConfig]:
        """The stage that trains optimizer step `step` (0-based)."""
        end = 0
        for i, stage in enumerate(self.stages):
            end += stage.steps
            if step < end:
                return i, stage
        return len(self.stages) - 1, self.stages[-1]

    def validate(self) -> None:
        errors = []
        if not self.stages:
            errors.append("at least one stage is required")
        for i, s in enumerate(self.stages):
            if s.steps < 1 or s.batch_size < 1 or s.resolution < 8:
                errors.append(f"stage {i} ({s.name}) needs steps >= 1, batch_size >= 1, resolution >= 8: {s}")
            if s.capacity_factors and len(s.capacity_factors) != self.model.num_layers:
                errors.append(
                    f"stage {i} capacity_factors has {len(s.capacity_factors)} entries, model has {self.model.num_layers} layers"
                )
            if s.tier_weights and len(s.tier_weights) != 5:
                errors.append(f"stage {i} tier_weights needs 5 entries (tiers 1..5), got {len(s.tier_weights)}")
            if s.bucket_weights and len(s.bucket_weights) != 8:
                errors.append(f"stage {i} bucket_weights needs 8 entries (buckets 1..8), got {len(s.bucket_weights)}")
            if s.wavelet_weight < 0:
                errors.append(f"stage {i} wavelet_weight must be >= 0, got {s.wavelet_weight}")
            for ratio in s.aspect_ratios:
                parse_ratio(ratio)
        if self.grad_accum_steps < 1 or any(s.batch_size % self.grad_accum_steps for s in self.stages):
            errors.append(
                f"grad_accum_steps={self.grad_accum_steps} must be >= 1 and divide every stage's batch_size "
                f"{[s.batch_size for s in self.stages]}"
            )
        if self.mixed_precision not in ("auto", "bf16", "no"):
            errors.append(f"mixed_precision {self.mixed_precision!r}; accepted: auto, bf16, no")
        if self.merge_weights not in ("inverse-sqrt", "uniform"):
            errors.append(f"merge_weights {self.merge_weights!r}; accepted: inverse-sqrt, uniform")
        if not 0.0 <= self.timesteps.uniform_share <= 1.0 or not 0.0 <= self.caption_dropout < 1.0:
            errors.append("timesteps.uniform_share must be in [0, 1] and caption_dropout in [0, 1)")
        if self.alignment_weight < 0 or not 0 <= self.alignment_block < self.model.num_layers:
            errors.append(
                f"alignment_weight must be >= 0 and alignment_block in [0, {self.model.num_layers}), got "
                f"{self.alignment_weight} and {self.alignment_block}"
            )
        if (
            self.binding_weight < 0
            or not self.binding_blocks
            or not all(0 <= b < self.model.num_layers for b in self.binding_blocks)
        ):
            errors.append(
                f"binding_weight must be >= 0 and binding_blocks a non-empty list of blocks in "
                f"[0, {self.model.num_layers}), got {self.binding_weight} and {list(self.binding_blocks)}"
            )
        if self.image_cache_mb < 0 or (self.image_cache_mb and self.data_workers):
            errors.append(
                f"image_cache_mb={self.image_cache_mb} must be >= 0 and needs data_workers=0 (each worker "
                f"would hold its own copy); data_workers={self.data_workers}"
            )
        if not 0.0 <= self.contrastive_weight < 1.0:
            errors.append(f"contrastive_weight must be in [0, 1), got {self.contrastive_weight}")
        if self.z_loss_weight < 0 or not 0 <= self.orthogonality_step < 0.5 or self.wavelet_levels < 1:
            errors.append("z_loss_weight >= 0, orthogonality_step in [0, 0.5) and wavelet_levels >= 1 are required")
        if self.load_balance_weight < 0:
            errors.append(f"load_balance_weight must be >= 0, got {self.load_balance_weight}")
        errors += self.optimizer.errors()
        if self.time_budget_s < 0:
            errors.append(f"time_budget_s must be >= 0 (0 = no budget), got {self.time_budget_s}")
        if not 0.0 <= self.ema_decay < 1.0:
            errors.append(f"ema_decay must be in [0, 1) (0 = no EMA), got {self.ema_decay}")
        if self.checkpoint_every < 1 or self.keep_last < 1:
            errors.append("checkpoint_every >= 1 and keep_last >= 1 are required")
        if errors:
            raise ValueError("invalid TrainConfig: " + "; ".join(errors))

    # ---- overrides and (de)serialisation -------------------------------------------------------------------
    def override(self, assignments: list[str]) -> TrainConfig:
        """Apply `key=value` assignments (dotted paths, list indices, `model.<field>`); values parse as JSON,
        falling back to a plain string. The optimizer's old flat names (`lr=3e-3`, `optimizer=adamw`) are aliases
        of its nested keys (`optimizer.lr`, `optimizer.kind`). Returns a new validated config."""
        data = self.to_dict()
        model_changes = {}
        for item in assignments:
            if "=" not in item:
                raise ValueError(f"--set {item!r} is not key=value (e.g. optimizer.lr=3e-4, stages.0.steps=200)")
            key, raw = item.split("=", 1)
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            if key.startswith("model."):
                # Through NucleusConfig.replace, which keeps dependent fields (per-layer CFs) consistent.
                model_changes[key.split(".", 1)[1]] = value
                continue
            if key in LEGACY_OPTIMIZER_KEYS and not (key == "optimizer" and isinstance(value, dict)):
                key = f"optimizer.{LEGACY_OPTIMIZER_KEYS[key]}"
            set_dotted(data, key, value)
        if model_changes:
            data["model"] = self.model.replace(**model_changes)
        return TrainConfig.from_dict(data)

    def to_dict(self) -> dict:
        out: dict[str, typing.Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "model":
                out[f.name] = {k: v for k, v in value.to_dict().items() if not k.startswith("_")}
                out[f.name]["router_input"] = value.router_input
                if value.kernels != "eager":  # how the run ran, so --resume runs the same way (not in config.json)
                    out[f.name]["kernels"] = value.kernels
            else:
                out[f.name] = to_plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """From `to_dict`'s output or a saved train_config.json (either optimizer layout); validated."""
        data = nest_legacy_optimizer(data)
        model = data.get("model")
        rest = {k: v for k, v in data.items() if k != "model"}
        cfg = from_plain(cls, rest, "TrainConfig")
        if model is not None:
            cfg.model = NucleusConfig.from_dict(model) if isinstance(model, dict) else model
        cfg.validate()
        return cfg

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def preset(cls, name: str) -> TrainConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown training preset {name!r}; accepted: {', '.join(PRESETS)}")
        cfg = PRESETS[name]()
        cfg.validate()
        return cfg


def parse_ratio(ratio: str) -> float:
    """'16:9' -> 16/9 (width over height)."""
    try:
        w, h = (float(x) for x in ratio.split(":"))
        assert w > 0 and h > 0
    except (ValueError, AssertionError):
        raise ValueError(f"aspect ratio {ratio!r} is not W:H with positive numbers (e.g. 4:3)") from None
    return w / h


# ---- plain (JSON) forms of typed config dataclasses -------------------------------------------------------------
def to_plain(value):
    """Dataclasses as dicts and tuples as lists, recursively: what json.dumps writes."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def from_plain(cls, data: dict, name: str):
    """`cls` built from a plain dict, nested dataclasses included; an unknown field or a value that does not fit
    its declared type is refused by name. Missing fields keep their defaults."""
    if not isinstance(data, dict):
        raise ValueError(f"{name}={data!r}: expected a section (a JSON object)")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"unknown {name} fields {sorted(unknown)}; accepted: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{name}.{k}" if name[0].islower() else k) for k, v in data.items()})


def set_dotted(data: dict, key: str, value) -> None:
    """`data[a][b]... = value` for a dotted `key` (list indices allowed), refusing a path that names no field."""
    node, parts = data, key.split(".")
    for part in parts[:-1]:
        node = _child(node, part, key)
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key)] = value
    elif last in node:
        node[last] = value
    else:
        raise ValueError(f"--set {key!r}: no field {last!r}; accepted here: {', '.join(sorted(node))}")


def changed_fields(saved: object, current: object, prefix: str = "") -> list[str]:
    """Dotted paths of the leaves where two plain config dicts differ (what a refused resume names)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return sorted(
            p for k in set(saved) | set(current) for p in changed_fields(saved.get(k), current.get(k), f"{prefix}{k}.")
        )
    return [] if saved == current else [prefix.rstrip(".")]


def _child(node, part: str, key: str):
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if part not in node or not isinstance(node[part], (dict, list)):
        raise ValueError(
            f"--set {key!r}: {part!r} is not a section; sections: {', '.join(k for k, v in node.items() if isinstance(v, (dict, list)))}"
        )
    return node[part]


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ValueError(f"--set {key!r}: index {part!r} out of range 0..{len(node) - 1}")
    return int(part)


def _coerce(value, hint, name: str):
    """JSON gives lists where the dataclass wants tuples and ints where it wants floats, and dicts for nested
    sections; anything else that does not fit the declared type is refused by name."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        return _coerce(value, members[0], name) if len(members) == 1 else value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else from_plain(hint, value, name)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}={value!r}: expected a list")
        return [_coerce(v, args[0], f"{name}.{i}") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}={value!r}: expected a list")
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else None
        if inner is None and len(value) != len(args):
            raise ValueError(f"{name}={value!r}: expected {len(args)} entries")
        return tuple(_coerce(v, inner or args[i], name) for i, v in enumerate(value))
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{name}={value!r}: expected a number")
    if hint in (int, str, bool) and not isinstance(value, hint):
        raise ValueError(f"{name}={value!r}: expected {hint.__name__}")
    if hint is int and isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: expected int")
    return value


# ---- presets ---------------------------------------------------------------------------------------------------
def released() -> TrainConfig:
    """The report's recipe at full scale (64 H100s): 256 -> 512 -> 1024 px with the CF schedule of section 2.
    Needs the released encoders: `--set pipeline_dir=DIR` (a Nucleus-Image pipeline folder); the model is built
    on the meta device and only each rank's shards are materialised (`parallel.init=meta`)."""
    model = NucleusConfig.preset("released")
    late = (0.0,) * 3 + (4.0,) * 2 + (2.0,) * 27
    return TrainConfig(
        model=model,
        text_encoder="qwen3-vl",
        autoencoder="qwen-image",
        optimizer=OptimizerConfig(lr=1e-4, warmup_steps=1000),
        parallel=ParallelConfig(init="meta"),
        gradient_checkpointing=True,
        checkpoint_every=1000,
        keep_last=16,
        merge_last=16,
        log_every=50,
        sample_every=2000,
        stages=[
            StageConfig("256px", 100_000, 256, 4096, ALL_ASPECTS, (0.0,) * 3 + (8.0,) * 29),
            StageConfig("512px", 50_000, 512, 1024, ALL_ASPECTS, (0.0,) * 3 + (4.0,) * 29),
            StageConfig("1024px", 20_000, 1024, 256, ALL_ASPECTS, late, wavelet_weight=0.1),
        ],
    )


def tiny() -> TrainConfig:
    """The embedded default: the tiny MoE on the synthetic shapes domain, trained on 2 CPU cores in minutes
    (`make demo`). Two stages scale the recipe's resolution curriculum down (24 -> 32 px; pixel autoencoder,
    one token per 4x4 px) with its capacity-factor step-down (4 -> 2); the curriculum starts on the simpler
    scenes (buckets 1-4: one object, colours, two objects, two of a kind) and then samples all of them. Captions
    favour the short GenEval-like sentence (the granularity the held-out prompts use) and skip the paragraph
    granularities, whose text encoding would cost more CPU time than the steps it displaces.

    What the tuning found (compositional overall on the 111 held-out prompts, +-0.015 run to run): on 2 CPU
    cores, lr (3e-3 vs 1e-2), the timestep shift (mu -1 .. +0.5), width (128 vs 192), textured backgrounds and
    sampling steps/guidance all moved the score by less than that at 45k images. On an H200 (bf16, same preset)
    the score tracked optimizer steps and images: 0.02 for 1200 steps x 32, 0.05-0.06 for 1400 x 64, 0.16 for
    1400 x 256; at a fixed 90k images, 700 x 128 gave 0.02-0.03 (so steps count more than batch), lr 6e-3 gave
    0.06 vs 0.05 at 3e-3, and moving 200 steps from the 32 px to the 24 px stage gave 0.03 (the 32 px stage
    earns its cost). Hence: batch 64 (Muon's Newton-Schulz cost is per step: a third of a batch-32 step on CPU),
    as many steps as the budget holds, lr 6e-3, all cores (cpu_threads=0: 2 threads train 1.4x faster than one
    on an idle 2-core machine). 2 px tokens learnt less per second than 4 px tokens, 16 px tokens far less.
    The 4,000 images are decoded once and held in memory (~12 MB per bucket size) in the training process: a
    decoding worker process would take CPU time from the two training threads.

    The alignment head (training/alignment.py, weight 0.5 on block 1's tokens: per-token shape and colour maps)
    lifted the score at equal steps (600 steps, one thread: 0.125 / 0.098 / 0.086 over 3 seeds against 0.069 /
    0.070 without); weight 2.0 (0.088) and block 2 (0.073) did less, contrastive flow matching (lambda 0.05:
    0.048) hurt, and so did the binding loss against this recipe (weight 0.5 on blocks 1-2: 0.063 / 0.058 against
    0.090 / 0.121, 2 seeds). The head is not part of the model: `nucleus merge` and exported pipelines never hold it.

    `make demo` runs it under a wall-clock budget (`time_budget_s`, set by the Makefile): the steps below are
    the plan for an idle machine, which the time guard scales to the machine it finds."""
    model = NucleusConfig.preset("tiny")
    aspects = ("1:1", "4:3", "3:4")
    return TrainConfig(
        model=model,
        optimizer=OptimizerConfig(lr=6e-3, warmup_steps=50),
        checkpoint_every=50,
        keep_last=8,
        merge_last=6,
        log_every=10,
        sample_every=200,
        sample_steps=16,
        caption_dropout=0.1,
        caption_weights=(3.0, 1.0, 0.0, 0.0),
        cpu_threads=0,
        data_workers=0,
        image_cache_mb=64.0,
        alignment_weight=0.5,
        alignment_block=1,
        stages=[
            StageConfig("24px", 850, 24, 64, aspects, (0.0, 4.0, 4.0, 4.0), (), (3, 3, 2, 2, 1, 1, 1, 1)),
            StageConfig("32px", 600, 32, 64, aspects, (0.0, 2.0, 2.0, 2.0)),
        ],
    )


ALL_ASPECTS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3")
PRESETS = {"tiny": tiny, "released": released}
