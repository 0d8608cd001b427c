"""Sample-efficiency levers of the embedded default at equal steps: each arm is the tiny preset plus a few
`--set` overrides, trained from several seeds side by side (one CPU thread each), merged the preset's way and
scored on the held-out prompts. Prints one row per arm: mean overall and per-task scores over seeds with a 95%
interval (Student t over the seeds' overall scores; per task, Wilson over the pooled images).

    python benchmarks/levers.py --data runs/demo/data --out runs/levers --arms recipe,no_head --seeds 0,1,2 \\
        --steps 850,600 --parallel 3

An arm's runs are skipped when their report exists, so a rerun with more arms or seeds only adds what is missing.
Every run keeps `keep_last` checkpoints; `--merge-last` rescoring of other merge horizons reuses them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# name -> overrides on top of the tiny preset. Loss and head levers are options of TrainConfig.
ARMS: dict[str, list[str]] = {
    "recipe": [],
    "no_head": ["alignment_weight=0"],
    "cfm": ["contrastive_weight=0.05"],
    "head_hi": ["alignment_weight=2.0"],
    "head_b2": ["alignment_block=2"],
    "head_b3": ["alignment_block=3"],
    "wavelet": ["stages.1.wavelet_weight=0.5"],
    "mu_low": ["timesteps.mu_min=0.0", "timesteps.mu_max=0.65"],
    "mu_high": ["timesteps.mu_min=1.0", "timesteps.mu_max=1.65"],
    "mix_two": ["stages.0.bucket_weights=[2,2,3,1,3,1,3,1]", "stages.1.bucket_weights=[1,1,2,1,2,1,2,1]"],
    "lr_hi": ["optimizer.lr=1e-2"],
    "lr_lo": ["optimizer.lr=3.5e-3"],
    "batch_32": ["stages.0.batch_size=32", "stages.1.batch_size=32"],
    "no_ortho": ["orthogonality_step=0"],
    "bind": ["binding_weight=0.5", "binding_blocks=[1,2]"],
    "bind_all": ["binding_weight=0.5", "binding_blocks=[0,1,2,3]"],
    "bind_hi": ["binding_weight=2.0", "binding_blocks=[1,2]"],
    "ns3": ["optimizer.muon_ns_steps=3"],
    "wide": ["model.num_attention_heads=6", "model.num_key_value_heads=2", "model.moe_intermediate_dim=192"],
}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from nucleus_image.cli import main; sys.exit(main())", *args]


def one_thread_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / arm / f"seed{seed}"


def job(
    out: Path, data: Path, arm: str, seed: int, steps: list[int], samples: int, keep: int, prompts: Path
) -> list[list[str]]:
    """The commands of one run: train, merge, score (each skipped by `run_jobs` when its output exists)."""
    d = run_dir(out, arm, seed)
    sets = [
        f"seed={seed}",
        "cpu_threads=1",
        "data_workers=0",
        "image_cache_mb=64",
        f"keep_last={keep}",
        "sample_every=0",
    ]
    sets += [f"stages.{i}.steps={s}" for i, s in enumerate(steps)]
    sets += ARMS[arm]
    train = ["train", "--preset", "tiny", "--data", str(data), "--out", str(d / "run"), "--no-progress"]
    for item in sets:
        train += ["--set", item]
    merge = ["merge", str(d / "run"), "--out", str(d / "merged")]
    score = [
        "eval",
        "compositional",
        "--model",
        str(d / "merged"),
        "--prompts",
        str(prompts),
        "--out",
        str(d / "eval"),
        "--samples",
        str(samples),
        "--steps",
        "16",
        "--batch-size",
        "48",
    ]
    return [train, merge, score]


def run_jobs(
    out: Path,
    data: Path,
    plan: list[tuple[str, int]],
    steps: list[int],
    samples: int,
    keep: int,
    parallel: int,
    prompts: Path,
) -> None:
    pending = [(arm, seed) for arm, seed in plan if not (run_dir(out, arm, seed) / "eval" / "report.json").exists()]
    running: dict[tuple[str, int], tuple[subprocess.Popen, list]] = {}
    while pending or running:
        while pending and len(running) < parallel:
            arm, seed = pending.pop(0)
            d = run_dir(out, arm, seed)
            d.mkdir(parents=True, exist_ok=True)
            cmds = job(out, data, arm, seed, steps, samples, keep, prompts)
            if (d / "run" / "losses.json").exists():
                cmds = cmds[1:] if not (d / "merged").exists() else cmds[2:]
            elif (d / "run").exists():
                import shutil

                shutil.rmtree(d / "run")
            running[(arm, seed)] = (None, cmds)
        for key, (proc, cmds) in list(running.items()):
            if proc is not None and proc.poll() is None:
                continue
            if proc is not None and proc.returncode:
                print(
                    f"{key}: {cmds[0][:2]} failed ({proc.returncode}); see {run_dir(out, *key) / 'log.txt'}", flush=True
                )
                del running[key]
                continue
            if proc is not None:
                cmds = cmds[1:]
            if not cmds:
                print(f"{key}: done", flush=True)
                del running[key]
                continue
            # The child holds its own copy of the log's descriptor: ours closes at once.
            with open(run_dir(out, *key) / "log.txt", "a") as log:
                proc = subprocess.Popen(
                    cli(*cmds[0]), stdout=log, stderr=subprocess.STDOUT, env=one_thread_env(), start_new_session=True
                )
            running[key] = (proc, cmds)
            print(f"{key}: {cmds[0][0]} started", flush=True)
        time.sleep(2)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 0.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return centre - half, centre + half


T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}


def summarize(out: Path, arms: list[str], seeds: list[int]) -> list[dict]:
    rows = []
    for arm in arms:
        reports = []
        for seed in seeds:
            path = run_dir(out, arm, seed) / "eval" / "report.json"
            if path.exists():
                reports.append(json.loads(path.read_text()))
        if not reports:
            continue
        overall = np.array([r["overall"] for r in reports])
        half = (
            T95.get(len(overall) - 1, 2.0) * overall.std(ddof=1) / math.sqrt(len(overall))
            if len(overall) > 1
            else float("nan")
        )
        tasks = {}
        for t in reports[0]["tasks"]:
            k = sum(r["tasks"][t]["correct"] for r in reports)
            n = sum(r["tasks"][t]["images"] for r in reports)
            tasks[t] = (k / n, *wilson(k, n))
        rows.append(
            {
                "arm": arm,
                "seeds": len(reports),
                "overall": float(overall.mean()),
                "half": half,
                "per_seed": overall.round(3).tolist(),
                "tasks": tasks,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    if not rows:
        return "(no finished runs)"
    tasks = list(rows[0]["tasks"])
    head = "| arm | seeds | overall (95% t) | per seed | " + " | ".join(tasks) + " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['seeds']} | {r['overall']:.3f} +- {r['half']:.3f} | {r['per_seed']} | "
            + " | ".join(f"{r['tasks'][t][0]:.2f}" for t in tasks)
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--arms", default="recipe")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", default="850,600", help="steps per stage (the preset's plan for an idle machine)")
    p.add_argument("--samples", type=int, default=4, help="images per held-out prompt")
    p.add_argument("--prompts", help="held-out prompts (default: DATA/heldout_metadata.jsonl)")
    p.add_argument("--keep", type=int, default=8, help="checkpoints kept per run")
    p.add_argument("--parallel", type=int, default=3)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; accepted: {', '.join(ARMS)}")
    out, data = Path(args.out), Path(args.data)
    if not args.report_only:
        # Seeds outer, arms inner: the first finished runs already compare every arm on one seed.
        plan = [(arm, seed) for seed in seeds for arm in arms]
        prompts = Path(args.prompts) if args.prompts else data / "heldout_metadata.jsonl"
        run_jobs(
            out, data, plan, [int(s) for s in args.steps.split(",")], args.samples, args.keep, args.parallel, prompts
        )
    text = table(summarize(out, arms, seeds))
    print(text)


if __name__ == "__main__":
    main()
