"""The demo's training step, candidate recipes against the reference recipe, timed interleaved in one process so
the ratio holds on a loaded machine, with each candidate's per-phase split (data, forward, backward, optimizer).

    python benchmarks/demo_step.py --data runs/demo/data --arms recipe --steps 30 --threads 1

Each arm is a `Trainer` on the tiny preset plus `--set`-style overrides (the reference: the previous recipe). The
arms take turns, `--block` steps at a time, in the stage given by `--stage` (0: 24 px, 1: 32 px), after a few
untimed warm-up steps. Prints per arm the median seconds per step, the ratio to the reference, and the phase
split. Idle-machine step times follow from the reference's measured idle step time times the ratio.

Then, per arm, the FLOPs of one step counted from the shapes of the matrix products it runs (torch's
FlopCounterMode: matmuls, batched matmuls, attention; elementwise work counts zero), split by phase, the achieved
FLOP/s of each phase and its share of two peaks of the cores the run uses: the measured rate of a large float32
matrix product (what the BLAS reaches on this machine) and the nominal one (FMA width x 2 FMA units x clock, from
/proc/cpuinfo).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from nucleus_image.timing import PhaseTimer
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
    trainer._train_step(stage)  # counts the step in the run's state
    return time.perf_counter() - start


class FlopLaps(PhaseTimer):
    """A phase timer that also books the FLOPs counted since the previous lap to the phase."""

    def __init__(self, counter: FlopCounterMode):
        super().__init__()
        self.counter, self.flops, self._seen = counter, {}, 0

    def lap(self, name: str) -> None:
        super().lap(name)
        total = self.counter.get_total_flops()
        self.flops[name] = self.flops.get(name, 0) + total - self._seen
        self._seen = total


def step_flops(trainer: Trainer) -> dict[str, int]:
    """FLOPs of one step of `trainer` per phase (data, forward, backward, optimizer)."""
    counter = FlopCounterMode(display=False)
    timer, trainer.timer = trainer.timer, FlopLaps(counter)
    try:
        with counter:
            step(trainer)
        return dict(trainer.timer.flops)
    finally:
        trainer.timer = timer


def measured_peak(threads: int) -> float:
    """FLOP/s of a 2048 x 2048 float32 matrix product on `threads` threads (the BLAS's best on this machine)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / min(times)


def nominal_peak(threads: int) -> tuple[float, str]:
    """Nominal float32 FLOP/s of `threads` cores: vector lanes x 2 (FMA) x 2 FMA units x clock."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":")[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    mhz = next((float(line.split(":")[1]) for line in info.splitlines() if line.startswith("cpu MHz")), 0.0)
    lanes, isa = (16, "avx512") if "avx512f" in flags else (8, "avx2") if "fma" in flags else (4, "sse")
    return lanes * 2 * 2 * mhz * 1e6 * threads, f"{isa}, {mhz:.0f} MHz x {threads} cores"


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
        flop_counts = {a: step_flops(t) for a, t in trainers.items()}
        torch.set_num_threads(args.threads)
    ref = statistics.median(times["reference"])
    print(f"{'arm':<10} {'s/step':>7} {'ratio':>6}  phases (share of the arm's step)")
    for a in arms:
        med = statistics.median(times[a])
        split = trainers[a].timer.seconds
        total = sum(split.values())
        parts = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in split.items())
        print(f"{a:<10} {med:>7.3f} {med / ref:>6.3f}  {parts}")
    measured = measured_peak(args.threads)
    nominal, nominal_desc = nominal_peak(args.threads)
    print(
        f"peaks: measured {measured / 1e9:.1f} GFLOP/s (2048^2 float32 matmul, {args.threads} threads), "
        f"nominal {nominal / 1e9:.1f} GFLOP/s ({nominal_desc})"
    )
    print(f"{'arm':<10} {'phase':<10} {'GFLOP':>7} {'s':>7} {'GFLOP/s':>8} {'% measured':>10} {'% nominal':>9}")
    for a in arms:
        timed = len(times[a])
        rows = {p: (f, trainers[a].timer.seconds.get(p, 0.0) / timed) for p, f in flop_counts[a].items()}
        rows["step"] = (sum(f for f, _ in rows.values()), statistics.median(times[a]))
        for phase, (flops, secs) in rows.items():
            rate = flops / secs if secs else 0.0
            print(
                f"{a:<10} {phase:<10} {flops / 1e9:>7.2f} {secs:>7.3f} {rate / 1e9:>8.1f} "
                f"{100 * rate / measured:>9.0f}% {100 * rate / nominal:>8.0f}%"
            )


if __name__ == "__main__":
    main()
