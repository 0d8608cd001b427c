"""The demo's training step, candidate recipes against the reference recipe, timed interleaved in one process so
the ratio holds on a loaded machine, with each candidate's per-phase split (data, forward, backward, optimizer).

    python benchmarks/demo_step.py --data runs/demo/data --arms recipe --steps 30 --threads 1

Each arm is a `Trainer` on the tiny preset plus `--set`-style overrides (the reference: the previous recipe). The
arms take turns, `--block` steps at a time, in the stage given by `--stage` (0: 24 px, 1: 32 px), after a few
untimed warm-up steps. Prints per arm the median seconds per step, the ratio to the reference, and the phase
split. Idle-machine step times follow from the reference's measured idle step time times the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nucleus_image.training.config import TrainConfig
from nucleus_image.training.trainer import Trainer

# "reference": the demo's previous recipe, whose idle step time was measured (a decoding worker process, no head).
ARMS = {
    "reference": ["data_workers=1", "image_cache_mb=0", "alignment_weight=0", "contrastive_weight=0"],
    "recipe": [],
    "no_head": ["alignment_weight=0"],
    "cfm": ["contrastive_weight=0.05"],
    "bind": ["binding_weight=0.5", "binding_blocks=[1,2]"],
    "ns3": ["optimizer.muon_ns_steps=3"],
    "batch_32": ["stages.0.batch_size=32", "stages.1.batch_size=32"],
}


def build(arm: str, data: Path, out: Path, stage: int, threads: int) -> Trainer:
    sets = [f"cpu_threads={threads}", "sample_every=0", "checkpoint_every=100000", "time_budget_s=0"] + ARMS[arm]
    if stage:
        sets += ["stages.0.steps=1"]
    cfg = TrainConfig.preset("tiny").override(sets)
    trainer = Trainer(cfg, data, out / arm, progress=False)
    trainer.step = 1 if stage else 0
    trainer._enter_stage(stage)
    return trainer


def step(trainer: Trainer) -> float:
    stage = trainer.cfg.stages[trainer.stage_index]
    start = time.perf_counter()
    trainer._train_step(stage)
    trainer.step += 1
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--arms", default="recipe", help=f"comma-separated candidates (accepted: {', '.join(ARMS)})")
    p.add_argument("--steps", type=int, default=30, help="timed steps per arm")
    p.add_argument("--block", type=int, default=5, help="steps per turn")
    p.add_argument("--stage", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    arms = ["reference"] + [a for a in args.arms.split(",") if a and a != "reference"]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; accepted: {', '.join(ARMS)}")
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {a: build(a, Path(args.data), Path(tmp), args.stage, args.threads) for a in arms}
        for t in trainers.values():  # warm-up: allocations, caches, first batches
            for _ in range(3):
                step(t)
            t.timer.seconds.clear()
        times = {a: [] for a in arms}
        while min(len(v) for v in times.values()) < args.steps:
            for a, t in trainers.items():
                times[a] += [step(t) for _ in range(args.block)]
        torch.set_num_threads(args.threads)
    ref = statistics.median(times["reference"])
    print(f"{'arm':<10} {'s/step':>7} {'ratio':>6}  phases (share of the arm's step)")
    for a in arms:
        med = statistics.median(times[a])
        split = trainers[a].timer.seconds
        total = sum(split.values())
        parts = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in split.items())
        print(f"{a:<10} {med:>7.3f} {med / ref:>6.3f}  {parts}")


if __name__ == "__main__":
    main()
