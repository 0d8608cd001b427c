"""The decoupled-routing ablation: train the same preset twice, identical except `model.router_input` (decoupled:
the router reads [unmodulated token | timestep embedding]; coupled: [modulated token | timestep embedding]),
with the same seed, data and steps, then compare them side by side.

    nucleus ablate routing --data data/synth --out runs/ablate [--preset tiny] [--max-steps N] [--set key=value]

Each arm trains in its own `nucleus train` subprocess (in parallel by default: the tiny preset uses one CPU
thread per run), is merged with the run's own WSM setting, sampled on the held-out prompts and scored with the
compositional scorer, measured with the routing metrics (`nucleus_image.eval.routing`), and compared by FID
against ground-truth renderings of the same held-out prompts. Writes OUT/ablation.md and OUT/ablation.json (the
table), OUT/loss_curves.png, OUT/expert_load_side_by_side.png, OUT/expert_map_side_by_side.png, and per arm
OUT/<arm>/{run,merged,eval,routing}/. Re-running resumes: a finished arm is not trained again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..training.checkpoint import latest_checkpoint
from .routing import DEFAULT_SIGMAS

ARMS = ("decoupled", "coupled")
ARM_COLORS = {
    "decoupled": (30, 80, 200),
    "coupled": (200, 60, 30),
    "moe_muon_wsm": (30, 80, 200),
    "moe_muon_no_ortho": (120, 170, 230),
    "moe_adamw": (200, 60, 30),
    "dense_adamw": (40, 150, 60),
}


@dataclass
class AblationConfig:
    preset: str = "tiny"
    config: str | None = None  # a train_config.json instead of the preset
    seed: int = 0
    max_steps: int | None = None
    overrides: tuple[str, ...] = ()
    parallel: bool = True
    # Evaluation of each merged arm.
    per_task: int = 24
    samples: int = 4
    sample_steps: int = 16
    guidance: float = 4.0
    batch_prompts: int = 12
    routing_per_task: int = 4
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    fid: bool = True
    device: str = "cpu"
    threads: int = 0  # CPU threads in all (0: each `nucleus train` picks its default); parallel arms share them


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from nucleus_image.cli import main; sys.exit(main())", *args]


def train_command(cfg: AblationConfig, arm: str, data: Path, run_dir: Path) -> list[str]:
    """The `nucleus train` call of one arm: everything shared, only router_input differs."""
    base = ["--config", cfg.config] if cfg.config else ["--preset", cfg.preset]
    args = [
        "train",
        *base,
        "--data",
        str(data),
        "--out",
        str(run_dir),
        "--no-progress",
        "--set",
        f"model.router_input={arm}",
        "--set",
        f"seed={cfg.seed}",
    ]
    for item in cfg.overrides:
        args += ["--set", item]
    if cfg.max_steps is not None:
        args += ["--max-steps", str(cfg.max_steps)]
    if cfg.threads:
        args += ["--threads", str(max(1, cfg.threads // (len(ARMS) if cfg.parallel else 1)))]
    if latest_checkpoint(run_dir) is not None:  # `nucleus train` refuses --resume without a checkpoint
        args.append("--resume")
    return _cli(*args)


def train_arms(cfg: AblationConfig, data: Path, out: Path) -> dict[str, float]:
    """Train both arms (skipping one already finished); returns each arm's training wall time in seconds."""
    procs, started, walls = {}, {}, {}
    for arm in ARMS:
        arm_dir = out / arm
        arm_dir.mkdir(parents=True, exist_ok=True)
        timing = arm_dir / "train_time.json"
        if timing.exists() and (arm_dir / "run" / "losses.json").exists():
            walls[arm] = json.loads(timing.read_text())["wall_s"]
            print(f"{arm}: already trained ({walls[arm]:.0f} s), reusing {arm_dir / 'run'}")
            continue
        command = train_command(cfg, arm, data, arm_dir / "run")
        print(f"{arm}: training -> {arm_dir / 'run'} (log {arm_dir / 'train.log'})")
        started[arm] = time.perf_counter()
        with open(arm_dir / "train.log", "a") as log:  # the child keeps its own descriptor
            procs[arm] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        if not cfg.parallel:
            procs[arm].wait()
            _finish(procs.pop(arm), arm, started, walls, arm_dir)
    try:
        while procs:  # each arm's wall time ends when its own process does, not when it is joined
            for arm in [a for a, p in procs.items() if p.poll() is not None]:
                _finish(procs.pop(arm), arm, started, walls, out / arm)
            time.sleep(0.2)
    finally:  # one arm failed (or we were interrupted): do not leave the other training unattended
        for proc in procs.values():
            proc.terminate()
            proc.wait()
    return walls


def _finish(proc: subprocess.Popen, arm: str, started: dict, walls: dict, arm_dir: Path) -> None:
    code = proc.wait()
    if code != 0:
        tail = (arm_dir / "train.log").read_text()[-2000:]
        raise RuntimeError(f"training the {arm} arm failed (exit {code}); end of {arm_dir / 'train.log'}:\n{tail}")
    walls[arm] = time.perf_counter() - started[arm]
    (arm_dir / "train_time.json").write_text(json.dumps({"wall_s": walls[arm]}) + "\n")


def heldout_records(data: Path, per_task: int) -> list[dict]:
    from nucleus_image.data.synthetic import heldout_metadata

    file = data / "heldout_metadata.jsonl"
    if file.exists():
        records = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        by_task: dict[str, list[dict]] = {}
        for r in records:
            by_task.setdefault(r["tag"], []).append(r)
        return [r for rows in by_task.values() for r in rows[:per_task]]
    return heldout_metadata(0, per_task)


def heldout_real_images(records: list[dict], samples: int, size: int, folder: Path) -> Path:
    """Ground-truth renderings of the held-out prompts at the models' native size: the FID reference."""
    from nucleus_image.data.synthetic import SynthConfig, ground_truth_images

    if folder.exists() and len(list(folder.glob("*.png"))) == len(records) * samples:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = SynthConfig(size=max(size, 32), aspect_ratios=("1:1",))
    for i, images in enumerate(ground_truth_images(records, samples, seed=1, config=config)):
        for k, image in enumerate(images):
            image = image if image.size == (size, size) else image.resize((size, size), Image.Resampling.BOX)
            image.save(folder / f"{i:05d}_{k:02d}.png")
    return folder


def evaluate_arm(
    cfg: AblationConfig,
    arm: str,
    out: Path,
    records: list[dict],
    routing_records: list[dict],
    extractor=None,
    reference=None,
) -> dict:
    """Merge, sample + score, measure routing and FID for one trained arm."""
    from nucleus_image.eval.compositional import generate_samples, read_geneval_folder, score_folder, write_report
    from nucleus_image.eval.routing import inspect_pipeline
    from nucleus_image.eval.routing_report import write_report as write_routing
    from nucleus_image.pipeline import NucleusPipeline
    from nucleus_image.training.config import TrainConfig
    from nucleus_image.training.merge import merge_run

    arm_dir = out / arm
    run_dir = arm_dir / "run"
    train_cfg = TrainConfig.from_json(run_dir / "train_config.json")
    if train_cfg.model.router_input != arm:
        raise ValueError(f"{run_dir} was trained with router_input={train_cfg.model.router_input!r}, not {arm!r}")
    merged = merge_run(run_dir, train_cfg.merge_last, train_cfg.merge_weights, arm_dir / "merged")
    pipeline = NucleusPipeline.from_pretrained(merged, device=cfg.device)
    images_dir = arm_dir / "eval" / "images"
    generate_samples(
        pipeline, records, images_dir, cfg.samples, cfg.seed, cfg.sample_steps, cfg.guidance, "1:1", cfg.batch_prompts
    )
    report = score_folder(images_dir)
    write_report(report, arm_dir / "eval", read_geneval_folder(images_dir)[1])
    record, batch = inspect_pipeline(pipeline, routing_records, cfg.sigmas, cfg.seed)
    routing = write_routing(record, batch, arm_dir / "routing", {"router_input": arm})
    losses = json.loads((run_dir / "losses.json").read_text())
    result = {
        "steps": len(losses),
        "final_loss": float(losses[-1]),
        "mean_loss_last_100": float(np.mean(losses[-100:])),
        "compositional": {"overall": report["overall"], **{t: v["accuracy"] for t, v in report["tasks"].items()}},
        "routing": routing["summary"],
    }
    if extractor is not None:
        from nucleus_image.eval.fid import frechet_distance, set_statistics

        gen = set_statistics(images_dir, extractor, desc=f"inception ({arm})")
        result["fid_vs_heldout"] = frechet_distance(
            gen["mu"], gen["sigma"], reference["mu"], reference["sigma"], gen["root"], reference["root"]
        )
    return result


def run_ablation(cfg: AblationConfig, data: str | Path, out: str | Path) -> dict:
    from nucleus_image.data.synthetic import heldout_metadata
    from nucleus_image.pipeline.folder import read_geometry

    data, out = Path(data), Path(out)
    if not data.is_dir():
        raise ValueError(f"--data {str(data)!r} is not a dataset folder (make one with `nucleus data synth`)")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    walls = train_arms(cfg, data, out)
    records = heldout_records(data, cfg.per_task)
    routing_records = heldout_metadata(cfg.seed, cfg.routing_per_task)
    extractor = reference = None
    results = {}
    for arm in ARMS:
        if cfg.fid and extractor is None:
            from nucleus_image.eval.fid import InceptionFeatures, set_statistics
            from nucleus_image.training.config import TrainConfig

            size = TrainConfig.from_json(out / arm / "run" / "train_config.json").stages[-1].resolution
            real = heldout_real_images(records, cfg.samples, size, out / "heldout_real")
            extractor = InceptionFeatures(cfg.device)
            reference = set_statistics(real, extractor, desc="inception (held-out real)")
        results[arm] = evaluate_arm(cfg, arm, out, records, routing_records, extractor, reference)
        results[arm]["train_wall_s"] = walls[arm]
        results[arm]["sample_size"] = read_geometry(out / arm / "merged")[0]
    summary = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "data": str(data),
        "arms": results,
        "total_wall_s": time.perf_counter() - t0,
        "train_commands": {
            arm: [a for a in train_command(cfg, arm, data, out / arm / "run")[3:] if a != "--resume"] for arm in ARMS
        },
    }
    (out / "ablation.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "ablation.md").write_text(format_table(summary) + "\n")
    write_pictures(out)
    return summary


def table_rows(summary: dict) -> list[tuple[str, list]]:
    arms = [summary["arms"][a] for a in ARMS]
    rows = [
        ("steps", [a["steps"] for a in arms]),
        ("train wall time (s)", [a["train_wall_s"] for a in arms]),
        ("final loss", [a["final_loss"] for a in arms]),
        ("mean loss, last 100 steps", [a["mean_loss_last_100"] for a in arms]),
    ]
    for task in arms[0]["compositional"]:
        rows.append((f"compositional {task}", [a["compositional"].get(task) for a in arms]))
    if "fid_vs_heldout" in arms[0]:
        rows.append(("FID vs held-out renders", [a["fid_vs_heldout"] for a in arms]))
    r = [a["routing"] for a in arms]
    for key in ("timestep", "token", "interaction"):
        rows.append((f"logit variance share: {key}", [x["variance_share"][key] for x in r]))
    rows.append(("Jaccard of expert token sets across timesteps", [x["jaccard"] for x in r]))
    rows.append(("  (chance Jaccard)", [x["jaccard_chance"] for x in r]))
    for label in r[0]["nmi"]:
        rows.append((f"NMI(preferred expert; {label})", [x["nmi"][label] for x in r]))
    for label in r[0]["accuracy"]:
        rows.append(
            (
                f"accuracy expert -> {label} (chance)",
                [f"{x['accuracy'][label]:.3f} ({x['accuracy_chance'][label]:.3f})" for x in r],
            )
        )
    rows.append(("tokens picked by no expert", [x["no_expert_share"] for x in r]))
    return rows


def format_table(summary: dict) -> str:
    lines = ["| metric | " + " | ".join(ARMS) + " |", "|---|" + "---|" * len(ARMS)]
    for name, values in table_rows(summary):
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in values]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nTotal wall time {summary['total_wall_s']:.0f} s (training in "
        f"{'parallel' if summary['config']['parallel'] else 'sequence'}, then evaluation)."
    )
    return "\n".join(lines)


def write_pictures(out: Path) -> None:
    """Loss curves of both arms on one plot, and the arms' routing pictures side by side."""
    losses = {arm: json.loads((out / arm / "run" / "losses.json").read_text()) for arm in ARMS}
    loss_overlay(losses, out / "loss_curves.png")
    for name, pattern in (("expert_load", "expert_load.png"), ("expert_map", "expert_map_layer*.png")):
        panels = []
        for arm in ARMS:
            files = sorted((out / arm / "routing").glob(pattern))
            if files:
                panels.append((arm, Image.open(files[len(files) // 2]).convert("RGB")))
        if len(panels) == len(ARMS):
            w = sum(p.width for _, p in panels) + 10 * len(panels)
            sheet = Image.new("RGB", (w, max(p.height for _, p in panels) + 16), "white")
            x = 0
            for arm, p in panels:
                ImageDraw.Draw(sheet).text((x + 2, 2), arm, fill=ARM_COLORS[arm])
                sheet.paste(p, (x, 16))
                x += p.width + 10
            sheet.save(out / f"{name}_side_by_side.png")


def loss_overlay(losses: dict[str, list[float]], path: Path, width: int = 800, height: int = 450) -> Path:
    """Moving averages of each arm's loss (log y), in the arm's colour."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 70, width - 20, 30, height - 40
    smooth = {}
    for arm, values in losses.items():
        v = np.array([x if np.isfinite(x) and x > 0 else np.nan for x in values])
        v = np.where(np.isfinite(v), v, np.nanmean(v))
        window = max(1, len(v) // 50)
        smooth[arm] = np.convolve(v, np.ones(window) / window, mode="valid")
    lo = np.log10(min(s.min() for s in smooth.values()))
    hi = max(np.log10(max(s.max() for s in smooth.values())), lo + 1e-3)
    steps = max(len(v) for v in losses.values())
    for k, (arm, s) in enumerate(smooth.items()):
        offset = steps - len(s)
        pts = [
            (
                left + (right - left) * (i + offset) / max(steps - 1, 1),
                bottom - (bottom - top) * (np.log10(y) - lo) / (hi - lo),
            )
            for i, y in enumerate(s)
        ]
        if len(pts) > 1:
            draw.line(pts, fill=ARM_COLORS.get(arm, (0, 0, 0)), width=2)
        draw.text((left + 10 + 140 * k, 8), f"{arm}: final {losses[arm][-1]:.4f}", fill=ARM_COLORS.get(arm, (0, 0, 0)))
    for frac in (0.0, 0.5, 1.0):
        y = bottom - (bottom - top) * frac
        draw.text((5, y - 6), f"{10 ** (lo + frac * (hi - lo)):.4f}", fill="black")
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, bottom + 8), "step 0", fill="black")
    draw.text((right - 80, bottom + 8), f"step {steps}", fill="black")
    img.save(path)
    return path
