"""The Merge of Warmup-Stable-Merge: a weighted average of the last N checkpoints stands in for LR decay.

Checkpoints theta_0 (oldest) .. theta_{N-1} (newest) of a constant-LR run differ by the updates
Delta_i = theta_{i-1} - theta_i. A merge with coefficients c_j >= 0, sum_j c_j = 1, is

    sum_j c_j * theta_j = theta_0 - sum_{i=1}^{N-1} w_i * Delta_i,   w_i = sum_{j >= i} c_j,

i.e. the run replayed from theta_0 with the i-th window of updates scaled by w_i: a decay schedule
1 >= w_1 >= ... >= w_{N-1} > 0 applied after the fact (WSM, arXiv 2507.17634). Weight choices:

    uniform:      c_j = 1/N                               -> w_i = (N - i)/N, a linear decay to 1/N
    inverse-sqrt: c_j proportional to 1/sqrt(N - j)       (the newest, age 1, weighs most; the oldest,
                  age N, weighs 1/sqrt(N) of it)          -> w_i = sum_{j>=i} c_j, a concave decay that
                                                             keeps more of the recent updates

`decay_weights` returns the w_i a merge implies; `tests/test_merge.py` checks the identity above numerically.

`export_ema` is the baseline's counterpart: the moving average of the weights a run with `ema_decay` > 0 kept,
taken from its newest checkpoint, in the same pipeline folder layout.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch

MERGE_WEIGHTS = ("inverse-sqrt", "uniform")


def merge_coefficients(n: int, kind: str) -> list[float]:
    """c_0..c_{n-1}, oldest checkpoint first, summing to 1."""
    if n < 1:
        raise ValueError(f"merging needs at least one checkpoint, got n={n}")
    if kind == "uniform":
        raw = [1.0] * n
    elif kind == "inverse-sqrt":
        raw = [1.0 / math.sqrt(n - j) for j in range(n)]
    else:
        raise ValueError(f"unknown merge weights {kind!r}; accepted: {', '.join(MERGE_WEIGHTS)}")
    total = sum(raw)
    return [r / total for r in raw]


def decay_weights(coefficients: list[float]) -> list[float]:
    """w_1..w_{N-1}: the factor the merge applies to each window of updates between consecutive checkpoints."""
    return [sum(coefficients[i:]) for i in range(1, len(coefficients))]


def merge_state_dicts(state_dicts: list[dict[str, torch.Tensor]], coefficients: list[float]) -> dict[str, torch.Tensor]:
    """sum_j c_j * state_j per tensor, accumulated in float64 and returned in each tensor's own dtype."""
    if len(state_dicts) != len(coefficients) or not state_dicts:
        raise ValueError(f"{len(state_dicts)} state dicts but {len(coefficients)} coefficients")
    keys = set(state_dicts[0])
    for i, sd in enumerate(state_dicts[1:], 1):
        if set(sd) != keys:
            raise ValueError(f"checkpoint {i} has different tensors from checkpoint 0: {sorted(keys ^ set(sd))[:5]}")
    merged = {}
    for key, first in state_dicts[0].items():
        if not torch.is_floating_point(first):
            merged[key] = first.clone()  # integer buffers (none today) are not averaged
            continue
        acc = torch.zeros_like(first, dtype=torch.float64)
        for sd, c in zip(state_dicts, coefficients):
            acc.add_(sd[key].to(torch.float64), alpha=c)
        merged[key] = acc.to(first.dtype)
    return merged


def merge_run(run_dir: str | Path, last: int, weights: str, out: str | Path) -> Path:
    """Merge the newest `last` complete checkpoints of a run into a pipeline folder at `out` (diffusers layout:
    transformer/, vae/, text_encoder/, scheduler/) that `NucleusPipeline.from_pretrained(out)` loads."""
    from .checkpoint import INTERRUPTED, load_model_state

    run_dir = Path(run_dir)
    found = _checkpoints(run_dir)
    if last < 1:
        raise ValueError(f"--last must be >= 1, got {last}")
    # A checkpoint saved on an interrupt resumes a run but is not merged (unless the run ends there), so an
    # interrupted and resumed run merges the same checkpoints as an uninterrupted one.
    found = [(step, path) for step, path in found[:-1] if not (path / INTERRUPTED).exists()] + found[-1:]
    chosen = found[-last:]
    if len(chosen) < last:
        print(
            f"asked for the last {last} checkpoints; {str(run_dir)!r} holds {len(chosen)} (steps "
            f"{', '.join(str(s) for s, _ in chosen)}): merging those"
        )
    coefficients = merge_coefficients(len(chosen), weights)
    print(
        f"merging {len(chosen)} checkpoints ({weights}): "
        + ", ".join(f"step {step} x {c:.3f}" for (step, _), c in zip(chosen, coefficients))
    )
    merged = merge_state_dicts([load_model_state(path) for _, path in chosen], coefficients)
    record = {"weights": weights, "coefficients": coefficients, "decay_weights": decay_weights(coefficients)}
    return _export(run_dir, chosen, merged, out, record)


def export_ema(run_dir: str | Path, out: str | Path) -> Path:
    """The moving average of the weights kept by a run with `ema_decay` > 0, from its newest complete checkpoint,
    as a pipeline folder at `out` (the layout `merge_run` writes). The average is float32; each tensor is written
    in the dtype of the weights it averages."""
    from .checkpoint import load_ema_state, load_model_state

    run_dir = Path(run_dir)
    step, path = _checkpoints(run_dir)[-1]
    weights = load_model_state(path)
    ema = load_ema_state(path)
    unknown = sorted(set(ema) - set(weights))
    if unknown:
        raise ValueError(f"{str(path)!r}: its EMA holds tensors the weights do not: {unknown[:5]}")
    state = {k: ema[k].to(v.dtype) if k in ema else v for k, v in weights.items()}
    print(f"exporting the EMA of the weights at step {step} ({len(ema)} tensors)")
    return _export(run_dir, [(step, path)], state, out, {"ema": True})


def _checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    from .checkpoint import list_checkpoints

    if not (run_dir / "train_config.json").exists():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a training run folder (no train_config.json)")
    found = list_checkpoints(run_dir)
    if not found:
        raise ValueError(f"run {str(run_dir)!r} has no complete checkpoint to merge")
    return found


def _export(
    run_dir: Path, chosen: list[tuple[int, Path]], state: dict[str, torch.Tensor], out: str | Path, record: dict
) -> Path:
    """`state` (the transformer's weights made from the checkpoints `chosen`) with the run's encoders as a pipeline
    folder at `out`, and merge.json recording what it was made from."""
    from ..model import NucleusConfig, NucleusTransformer
    from .config import TrainConfig
    from .encoders import build_encoders
    from .sampling import make_pipeline

    cfg = TrainConfig.from_json(run_dir / "train_config.json")
    model_cfg = NucleusConfig.from_json(chosen[-1][1] / "config.json")
    model = NucleusTransformer(model_cfg)
    model.load_state_dict(state)
    text_encoder, autoencoder = build_encoders(cfg, torch.device("cpu"))
    # Native size: the resolution of the stage the newest merged checkpoint was trained in (a run stopped early,
    # or merged mid-run, has not reached the last configured stage). Checkpoint "step s" holds the weights
    # after optimizer step s - 1.
    stages = [cfg.stage_at(step - 1)[1] for step, _ in chosen]
    if len({s.name for s in stages}) > 1:
        warnings.warn(
            f"the merge window (steps {chosen[0][0]}..{chosen[-1][0]}) crosses a stage boundary "
            f"({' -> '.join(dict.fromkeys(s.name for s in stages))}): it averages weights trained at "
            f"different resolutions; merge fewer checkpoints (--last) to stay inside the last stage",
            stacklevel=3,
        )
    pipe = make_pipeline(model, text_encoder, autoencoder, cfg.timesteps, stages[-1].resolution)
    pipe.save_pretrained(out)
    record = {
        "run": str(run_dir),
        **record,
        "steps": [s for s, _ in chosen],
        "stages": [s.name for s in stages],
        "resolution": stages[-1].resolution,
    }
    (Path(out) / "merge.json").write_text(json.dumps(record, indent=1) + "\n")
    return Path(out)
