"""The recipe against baselines on the same data and the same wall-clock budget (issue 11).

    python benchmarks/recipe_vs_baseline.py --data runs/demo/data --out runs/recipe_vs_baseline --budget 600

Arms (each one `nucleus train --preset tiny` process with one CPU thread, all started together so they share the
machine alike, each with the same `time_budget_s`, so the time guard fits each arm's steps to the budget):

    moe_muon_wsm       the recipe: the tiny MoE, Muon + AdamW, router decorrelation step
    moe_muon_no_ortho  the recipe without the router decorrelation step (shows what that step changes)
    moe_adamw          the same MoE, AdamW for every parameter
    dense_adamw        a dense DiT of about equal active parameters (every block a SwiGLU of 512: 1.69M active
                       per token against the MoE's 1.65M at its first stage's capacity factors), AdamW

The caption cache is encoded once and copied into every arm's run folder first, so the budgets time training
alone. Every arm is then merged the same way (the preset's WSM: last 6 checkpoints, inverse-sqrt), so all arms get the
same stand-in for a learning-rate decay, and scored on the held-out prompts. Prints and writes OUT/comparison.md
and OUT/comparison.json (steps, images, mean loss of the last 10% of steps, router-row mean squared cosine of
the merged model, score per task) and OUT/loss_curves.png. AdamW arms use --adamw-lr (the recipe's 6e-3 is a
Muon rate: RMS-matched, but AdamW is usually run lower on small transformers).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

NO_MOE = "[0.0, 0.0, 0.0, 0.0]"


def arms(adamw_lr: float) -> dict[str, list[str]]:
    adamw = ["optimizer.kind=adamw", f"optimizer.lr={adamw_lr}"]
    dense = [
        "model.dense_moe_strategy=all_dense",
        "model.mlp_ratio=6",
        f"model.capacity_factors={NO_MOE}",
        f"stages.0.capacity_factors={NO_MOE}",
        f"stages.1.capacity_factors={NO_MOE}",
    ]
    return {
        "moe_muon_wsm": [],
        "moe_muon_no_ortho": ["orthogonality_step=0"],
        "moe_adamw": adamw,
        "dense_adamw": adamw + dense,
    }


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from nucleus_image.cli import main; sys.exit(main())", *args]


def encode_captions_once(data: Path) -> None:
    """Every caption's text states in the shared text-state cache before the arms start (`nucleus data
    encode-captions`), so no arm's budget pays for encoding them."""
    subprocess.run(cli("data", "encode-captions", str(data), "--no-progress"), check=True, stdout=subprocess.DEVNULL)


def train_all(
    data: Path, out: Path, budget: float, adamw_lr: float, threads: int, chosen: list[str]
) -> dict[str, float]:
    encode_captions_once(data)
    procs = {}
    for arm, sets in arms(adamw_lr).items():
        if arm not in chosen:
            continue
        run = out / arm / "run"
        if (run / "losses.json").exists():
            continue
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        args = [
            "train",
            "--preset",
            "tiny",
            "--data",
            str(data),
            "--out",
            str(run),
            "--no-progress",
            "--set",
            f"cpu_threads={threads}",
            "--set",
            f"time_budget_s={budget}",
        ]
        for item in sets:
            args += ["--set", item]
        with open(out / arm / "train.log", "w") as log:  # the child keeps its own descriptor
            procs[arm] = (subprocess.Popen(cli(*args), stdout=log, stderr=subprocess.STDOUT), time.perf_counter())
        print(f"{arm}: training (log {out / arm / 'train.log'})", flush=True)
    walls = {}
    for arm, (proc, start) in procs.items():
        code = proc.wait()
        walls[arm] = time.perf_counter() - start
        if code:
            raise SystemExit(f"{arm} failed (exit {code}); see {out / arm / 'train.log'}")
        (out / arm / "train_time.json").write_text(json.dumps({"wall_s": walls[arm]}) + "\n")
    return walls


def evaluate(out: Path, arm: str, data: Path, samples: int) -> dict:
    from safetensors.torch import load_file

    from nucleus_image.training.loss import router_orthogonality_loss

    arm_dir = out / arm
    if not (arm_dir / "eval" / "report.json").exists():
        for args in (
            ["merge", str(arm_dir / "run"), "--out", str(arm_dir / "merged")],
            [
                "eval",
                "compositional",
                "--model",
                str(arm_dir / "merged"),
                "--prompts",
                str(data / "heldout_metadata.jsonl"),
                "--out",
                str(arm_dir / "eval"),
                "--samples",
                str(samples),
                "--steps",
                "16",
                "--batch-size",
                "12",
            ],
        ):
            subprocess.run(cli(*args), check=True, stdout=subprocess.DEVNULL)
    report = json.loads((arm_dir / "eval" / "report.json").read_text())
    losses = json.loads((arm_dir / "run" / "losses.json").read_text())
    config = json.loads((arm_dir / "run" / "train_config.json").read_text())
    weights = {}
    for f in sorted((arm_dir / "merged" / "transformer").glob("*.safetensors")):
        weights.update(load_file(f))
    gates = [w for k, w in weights.items() if k.endswith("gate.weight")]
    tail = max(1, len(losses) // 10)
    return {
        "steps": len(losses),
        "images": sum(s["steps"] * s["batch_size"] for s in config["stages"]),
        "final_loss": float(np.mean(losses[-tail:])),
        "router_row_cos2": float(router_orthogonality_loss(gates)) if gates else None,
        "overall": report["overall"],
        "tasks": {t: v["accuracy"] for t, v in report["tasks"].items()},
        "wall_s": json.loads((arm_dir / "train_time.json").read_text())["wall_s"],
        "losses": losses,
    }


def table(results: dict) -> str:
    tasks = list(next(iter(results.values()))["tasks"])
    head = "| arm | train s | steps | images | final loss | router cos^2 | " + " | ".join(tasks) + " | overall |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for arm, r in results.items():
        cos2 = "-" if r["router_row_cos2"] is None else f"{r['router_row_cos2']:.4f}"
        lines.append(
            f"| {arm} | {r['wall_s']:.0f} | {r['steps']} | {r['images']} | {r['final_loss']:.4f} | {cos2} | "
            + " | ".join(f"{r['tasks'][t]:.3f}" for t in tasks)
            + f" | **{r['overall']:.3f}** |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a `nucleus data synth` folder (the demo's)")
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=600, help="training wall-clock seconds per arm (default 600)")
    p.add_argument("--adamw-lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per arm (default 1)")
    p.add_argument("--samples", type=int, default=2, help="images per held-out prompt (default 2)")
    p.add_argument("--arms", default=",".join(arms(0.0)), help="comma-separated subset of the arms (default all)")
    args = p.parse_args()
    out, data = Path(args.out), Path(args.data)
    chosen = args.arms.split(",")
    unknown = sorted(set(chosen) - set(arms(0.0)))
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; accepted: {', '.join(arms(0.0))}")
    train_all(data, out, args.budget, args.adamw_lr, args.threads, chosen)
    results = {arm: evaluate(out, arm, data, args.samples) for arm in chosen}
    from nucleus_image.eval.ablation import loss_overlay

    loss_overlay({arm: r.pop("losses") for arm, r in results.items()}, out / "loss_curves.png")
    text = table(results)
    (out / "comparison.md").write_text(text + "\n")
    (out / "comparison.json").write_text(
        json.dumps(
            {"budget_s": args.budget, "adamw_lr": args.adamw_lr, "threads": args.threads, "arms": results}, indent=1
        )
        + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
