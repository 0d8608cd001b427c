"""The announcement's claims reproduced in miniature: each claim is a controlled comparison on the tiny preset,
the control being the preset itself and every other arm the preset plus a few `--set` overrides, all trained with
the same seeds, steps and batch, then merged, sampled on the held-out prompts and scored.

    nucleus ablate claims --claim routing --data data/synth --out runs/claims --seeds 0,1,2
    nucleus ablate claims --claim routing,capacity --data data/synth --out runs/claims --steps 300,200 --parallel 2
    nucleus ablate claims --claim merge --out runs/claims --report-only --write-doc docs/claims.md

A run is one (arm, seed): `nucleus train` (one thread), `nucleus merge`, `nucleus eval compositional` and, for
the claims about routing, `nucleus inspect-routing`, chained in one child process (`--parallel` children at a
time). A run whose outputs exist is skipped, so a rerun with more seeds or claims adds only what is missing; the
control trains once for all claims (the merge claim only re-merges its checkpoints: every run keeps 16).

What each claim reports (OUT/<claim>/claim.json, claim.md, claim.png):
- per arm, the mean overall compositional score over seeds (95% Student t over the seeds) and per task (Wilson
  over the pooled images);
- the paired difference arm - control over the seeds both finished, with a 95% Student t interval of the per-seed
  differences (the seeds are shared, so seed-to-seed variation cancels), and the verdict: "reproduced" (the
  difference lies on the claimed side and the interval excludes 0), "inverted" (the other side, excluding 0),
  "not reproduced at this scale" (the interval includes 0). An arm the claim says is merely no better than the
  control (fixed capacity factor 4, which spends more compute) is "reproduced" only when its interval's upper end
  stays within `NONINFERIORITY_MARGIN` of the control (a non-inferiority test), "inverted" when it is significantly
  better, and "not reproduced at this scale" when the interval is too wide to tell;
- final loss (mean of the last `LOSS_TAIL` steps' losses) and loss spikes (steps whose loss exceeds `SPIKE_RATIO`
  times the median of the `SPIKE_WINDOW` steps before it, from step 10 on), means over seeds;
- for routing claims, the routing metrics of `nucleus_image.eval.routing`: expert homogeneity by shape, colour
  and region (1 = every expert sees the same mix) and the timestep's share of the router-logit variance.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..training.checkpoint import latest_checkpoint
from .ablation import heldout_records
from .compositional import wilson_interval


@dataclass(frozen=True)
class Arm:
    """One side of a comparison. `trained_as` names the arm whose training runs this one merges instead of
    training its own (the merge horizons re-merge the control's checkpoints)."""

    name: str
    label: str
    overrides: tuple[str, ...] = ()
    merge_last: int | None = None  # checkpoints merged (None: the run's merge_last)
    ema: bool = False  # merge the run's EMA weights (`nucleus merge --ema`)
    trained_as: str | None = None
    claimed: str = "worse"  # what the claim says of this arm against the control: "worse", "better", "not better"

    @property
    def run_name(self) -> str:
        return self.trained_as or self.name

    @property
    def trains(self) -> bool:
        return self.trained_as is None


@dataclass(frozen=True)
class Claim:
    name: str
    statement: str
    control: Arm
    arms: tuple[Arm, ...]
    routing: bool = False  # also measure the routing metrics

    @property
    def all_arms(self) -> tuple[Arm, ...]:
        return (self.control, *self.arms)


CONTROL = "control"  # the preset itself: one training per seed, shared by every claim


def _control(label: str) -> Arm:
    return Arm(CONTROL, label)


def _merged(n: int, label: str, claimed: str = "better") -> Arm:
    return Arm(f"merge_last{n}", label, merge_last=n, trained_as=CONTROL, claimed=claimed)


CLAIMS: dict[str, Claim] = {
    c.name: c
    for c in (
        Claim(
            "routing",
            "Decoupled routing (the router reads the unmodulated token and the timestep embedding) composes better "
            "than coupled routing (the router reads the timestep-modulated token).",
            _control("decoupled"),
            (Arm("coupled", "coupled", ("model.router_input=coupled",)),),
            routing=True,
        ),
        Claim(
            "choice",
            "Expert-choice routing beats token-choice routing (top-2 with a load-balancing loss) at the same expert "
            "capacity.",
            _control("expert choice"),
            (
                Arm(
                    "token_choice",
                    "token choice, top 2",
                    ("model.router_type=token_choice", "model.router_top_k=2", "load_balance_weight=0.01"),
                ),
            ),
            routing=True,
        ),
        Claim(
            "optimizer",
            "Muon under Warmup-Stable-Merge beats AdamW, with an EMA of the weights or with a cosine decay.",
            _control("Muon + WSM"),
            # AdamW at 8e-3, the best of a one-seed sweep of AdamW + cosine at screen length (1e-3, 2e-3, 4e-3, 8e-3,
            # 1.6e-2 scored 0.005, 0.031, 0.056, 0.068, 0.063: docs/claims.md), so the baseline is not handicapped by
            # its rate; an EMA horizon of ~200 steps (0.995), since a 0.999 average over ~1000 steps would still hold
            # much of the initial weights at the end of a run of a few hundred to 1,450 steps.
            (
                Arm(
                    "adamw_ema",
                    "AdamW + EMA",
                    ("optimizer.kind=adamw", "optimizer.lr=8e-3", "ema_decay=0.995"),
                    ema=True,
                ),
                Arm(
                    "adamw_cosine",
                    "AdamW + cosine",
                    ("optimizer.kind=adamw", "optimizer.lr=8e-3", "optimizer.schedule=cosine"),
                ),
            ),
        ),
        Claim(
            "capacity",
            "Stepping the capacity factor down from 4 to 2 between stages beats a fixed 2 and loses nothing "
            "against a fixed 4 (which spends more expert compute in the second stage).",
            _control("CF 4 -> 2"),
            (
                Arm(
                    "cf_fixed2",
                    "CF 2 -> 2",
                    ("stages.0.capacity_factors=[0,2,2,2]", "stages.1.capacity_factors=[0,2,2,2]"),
                ),
                Arm(
                    "cf_fixed4",
                    "CF 4 -> 4",
                    ("stages.0.capacity_factors=[0,4,4,4]", "stages.1.capacity_factors=[0,4,4,4]"),
                    claimed="not better",
                ),
            ),
        ),
        Claim(
            "merge",
            "Merging the last checkpoints (the Merge of Warmup-Stable-Merge) beats the last checkpoint alone.",
            _merged(1, "last checkpoint only", claimed="worse"),
            (_merged(3, "merge last 3"), _merged(6, "merge last 6"), _merged(16, "merge last 16")),
        ),
    )
}
KEEP_LAST = 16  # checkpoints every run keeps: the merge claim's longest horizon
LOSS_TAIL = 50
SPIKE_RATIO, SPIKE_WINDOW = 1.5, 50
SAMPLE_STEPS, EVAL_BATCH = 16, 48
# How much better than the control an arm claimed "not better" may be and still count as no better: two points of
# the overall score, below the smallest gain the announcement reports (+3.2 points for merging).
NONINFERIORITY_MARGIN = 0.02


@dataclass
class ClaimsConfig:
    claims: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ()  # only these arms (and the control) of the claims; empty = all
    max_steps: int | None = None
    stage_steps: tuple[int, ...] = ()  # steps per stage instead of the preset's
    overrides: tuple[str, ...] = ()  # applied to every arm
    checkpoint_every: int = 0  # 0: what fits KEEP_LAST checkpoints into the last stage (at most the preset's)
    parallel: int = 2
    per_task: int = 24
    samples: int = 4
    routing_per_task: int = 4


def select(cfg: ClaimsConfig) -> list[tuple[Claim, list[Arm]]]:
    """The claims and arms asked for; unknown names are refused with the accepted ones."""
    unknown = [c for c in cfg.claims if c not in CLAIMS]
    if unknown or not cfg.claims:
        raise ValueError(f"unknown claim {', '.join(unknown) or '(none given)'}; accepted: {', '.join(CLAIMS)}")
    picked = [(CLAIMS[c], [a for a in CLAIMS[c].arms if not cfg.arms or a.name in cfg.arms]) for c in cfg.claims]
    names = {a.name for c, _ in picked for a in c.all_arms}  # naming the control too is allowed: it always runs
    if set(cfg.arms) - names:
        raise ValueError(
            f"unknown arm {', '.join(sorted(set(cfg.arms) - names))} for claims {', '.join(cfg.claims)}; "
            f"accepted: {', '.join(sorted(names))}"
        )
    return [(c, [c.control, *arms]) for c, arms in picked]


def common_overrides(cfg: ClaimsConfig, seed: int) -> list[str]:
    """What every arm's training shares: the seed, one thread, the kept checkpoints, the steps, the user's sets."""
    from ..training.config import TrainConfig

    base = TrainConfig.preset("tiny").override(
        [f"stages.{i}.steps={s}" for i, s in enumerate(cfg.stage_steps)] + list(cfg.overrides)
    )
    steps, left = [], cfg.max_steps if cfg.max_steps is not None else base.total_steps
    for stage in base.stages:
        steps.append(min(stage.steps, left))
        left -= steps[-1]
    last = [s for s in steps if s > 0][-1]
    every = cfg.checkpoint_every or max(1, min(base.checkpoint_every, last // KEEP_LAST))
    sets = [f"seed={seed}", "cpu_threads=1", f"keep_last={KEEP_LAST}", f"checkpoint_every={every}", "sample_every=0"]
    return sets + [f"stages.{i}.steps={s}" for i, s in enumerate(cfg.stage_steps)] + list(cfg.overrides)


def check_arms(cfg: ClaimsConfig, selected: list[tuple[Claim, list[Arm]]]) -> None:
    """Every arm's config must resolve before anything trains: a key this version lacks is named with its arm."""
    from ..training.config import TrainConfig

    for claim, arms in selected:
        for arm in arms:
            try:
                TrainConfig.preset("tiny").override(common_overrides(cfg, 0) + list(arm.overrides))
            except ValueError as err:
                raise ValueError(
                    f"claim {claim.name}, arm {arm.name} (--set {' --set '.join(arm.overrides)}): {err}"
                ) from None


# ---- runs ------------------------------------------------------------------------------------------------------
def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / name / f"seed{seed}"


def train_command(cfg: ClaimsConfig, arm: Arm, seed: int, data: Path, out: Path) -> list[str]:
    args = ["train", "--preset", "tiny", "--data", str(data), "--out", str(run_dir(out, arm.name, seed) / "run")]
    args += ["--no-progress", "--threads", "1"]
    for item in common_overrides(cfg, seed) + list(arm.overrides):
        args += ["--set", item]
    if cfg.max_steps is not None:
        args += ["--max-steps", str(cfg.max_steps)]
    return args


def run_commands(
    cfg: ClaimsConfig, arm: Arm, seed: int, data: Path, out: Path, routing: bool, train_only: bool = False
) -> list[list[str]]:
    """The commands of one run still to do: train unless `losses.json` exists, then (unless `train_only`) merge,
    score and, with `routing`, measure the routing."""
    d, source = run_dir(out, arm.name, seed), run_dir(out, arm.run_name, seed) / "run"
    commands = []
    train, job = train_command(cfg, arm, seed, data, out), d / "train_command.json"
    if arm.trains and job.exists() and json.loads(job.read_text()) != train:
        raise ValueError(
            f"{d} was trained with other settings (see {job}); give another --out, or the same steps and --set"
        )
    if arm.trains and not (source / "losses.json").exists():
        d.mkdir(parents=True, exist_ok=True)
        job.write_text(json.dumps(train) + "\n")
        if latest_checkpoint(source) is not None:
            train.append("--resume")
        elif source.exists():
            shutil.rmtree(source)  # started but never checkpointed: start over
        commands.append(train)
    if train_only:
        return commands
    merged = d / "merged"
    if not (merged / "merge.json").exists():
        merge = ["merge", str(source), "--out", str(merged), "--threads", "1"]
        merge += ["--last", str(arm.merge_last)] if arm.merge_last else []
        commands.append(merge + (["--ema"] if arm.ema else []))
    if not (d / "eval" / "report.json").exists():
        commands.append(
            ["eval", "compositional", "--model", str(merged), "--prompts", str(out / "prompts.jsonl")]
            + ["--out", str(d / "eval"), "--samples", str(cfg.samples), "--steps", str(SAMPLE_STEPS)]
            + ["--batch-size", str(EVAL_BATCH), "--device", "cpu", "--threads", "1"]
        )
    if routing and not (d / "routing" / "routing.json").exists():
        commands.append(
            ["inspect-routing", "--model", str(merged), "--prompts", str(out / "routing_prompts.jsonl")]
            + ["--out", str(d / "routing"), "--device", "cpu", "--threads", "1"]
        )
    return commands


# One child per run: the `nucleus` commands in order in one process (torch imported once), stopping at a failure.
WORKER = (
    "import json, sys\nfrom nucleus_image.cli import main\nfor argv in json.loads(sys.argv[1]):\n"
    "    print('$ nucleus ' + ' '.join(argv), flush=True)\n    code = main(argv)\n    if code:\n"
    "        sys.exit(code)\n"
)


def plan_runs(cfg: ClaimsConfig, selected, data: Path, out: Path) -> list[tuple[Arm, int, list[list[str]]]]:
    """Seeds outer, arms inner (the first finished runs already compare every arm on one seed); one run per
    (arm, seed) however many claims share it, and the control's training wherever an arm merges it."""
    routing = {a.name for c, arms in selected if c.routing for a in arms}
    arms = {a.name: a for _, claim_arms in selected for a in claim_arms}
    sources = {a.run_name for a in arms.values()} - set(arms)  # trained only for others to merge
    arms.update({name: _control(name) for name in sources})
    plan = []
    for seed in cfg.seeds:
        for arm in sorted(arms.values(), key=lambda a: (not a.trains, a.name != CONTROL)):
            commands = run_commands(cfg, arm, seed, data, out, arm.name in routing, arm.name in sources)
            if commands:
                plan.append((arm, seed, commands))
    return plan


def execute(plan, out: Path, parallel: int, env: dict | None = None) -> list[str]:
    """Run the plan, `parallel` children at a time, a run that merges another's training only once that training
    has finished. Returns the failures (each naming its log); the other runs go on."""
    import os

    env = env or dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    pending, running, failed = list(plan), {}, []
    training = {(a.name, s) for a, s, cmds in plan if cmds and cmds[0][0] == "train"}
    try:
        while pending or running:
            for key, (proc, started) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[key]
                training.discard(key)
                log = run_dir(out, *key) / "log.txt"
                if proc.returncode:
                    failed.append(f"{key[0]} seed {key[1]}: exit {proc.returncode}, see {log}")
                print(
                    f"{key[0]} seed {key[1]}: {'failed' if proc.returncode else 'done'} "
                    f"({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
            for item in list(pending):
                if len(running) >= parallel:
                    break
                arm, seed, commands = item
                if not arm.trains and not (run_dir(out, arm.run_name, seed) / "run" / "losses.json").exists():
                    if (arm.run_name, seed) not in training:  # that training failed
                        failed.append(f"{arm.name} seed {seed}: the {arm.run_name} run it merges did not train")
                        pending.remove(item)
                    continue  # its training is still going
                pending.remove(item)
                d = run_dir(out, arm.name, seed)
                d.mkdir(parents=True, exist_ok=True)
                with open(d / "log.txt", "a") as log:  # the child keeps its own descriptor
                    proc = subprocess.Popen(
                        [sys.executable, "-c", WORKER, json.dumps(commands)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                running[(arm.name, seed)] = (proc, time.perf_counter())
                print(f"{arm.name} seed {seed}: {', '.join(c[0] for c in commands)} started", flush=True)
            time.sleep(0.5)
    finally:  # interrupted: do not leave children training unattended
        for proc, _ in running.values():
            proc.terminate()
            proc.wait()
    return failed


# ---- summaries -------------------------------------------------------------------------------------------------
def t_half_width(values) -> float:
    """Half width of the 95% Student t interval of the mean; nan with fewer than two values."""
    from scipy.stats import t

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float("nan")
    return float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def verdict(diff: float, half: float, claimed: str) -> str:
    """The verdict on `diff` = arm - control with a 95% half width `half`, for what the claim says of the arm."""
    if not math.isfinite(half):
        return "not reproduced at this scale (one seed: no interval)"
    better, worse = diff - half > 0, diff + half < 0
    if claimed == "not better":
        if better:
            return "inverted"
        return "reproduced" if diff + half <= NONINFERIORITY_MARGIN else "not reproduced at this scale"
    if (claimed == "worse" and worse) or (claimed == "better" and better):
        return "reproduced"
    return "inverted" if better or worse else "not reproduced at this scale"


def loss_statistics(losses: list[float]) -> tuple[float, int]:
    """(mean of the last LOSS_TAIL finite losses, spikes: steps from 10 on whose loss exceeds SPIKE_RATIO times
    the median of the SPIKE_WINDOW steps before)."""
    v = np.asarray(losses, dtype=np.float64)
    finite = v[np.isfinite(v)]
    spikes = sum(
        1
        for i in range(10, len(v))
        if not np.isfinite(v[i]) or v[i] > SPIKE_RATIO * np.nanmedian(v[max(0, i - SPIKE_WINDOW) : i])
    )
    return float(finite[-LOSS_TAIL:].mean()) if len(finite) else float("nan"), spikes


def seed_results(out: Path, arm: Arm, seeds) -> dict[int, dict]:
    """Per finished seed: the report, the run's losses and the routing summary (when measured)."""
    results = {}
    for seed in seeds:
        d = run_dir(out, arm.name, seed)
        report_file, losses_file = d / "eval" / "report.json", run_dir(out, arm.run_name, seed) / "run" / "losses.json"
        if not report_file.exists() or not losses_file.exists():
            continue
        routing = d / "routing" / "routing.json"
        results[seed] = {
            "report": json.loads(report_file.read_text()),
            "losses": json.loads(losses_file.read_text()),
            "routing": json.loads(routing.read_text())["summary"] if routing.exists() else None,
        }
    return results


def summarize_arm(arm: Arm, results: dict[int, dict], control: dict[int, dict] | None) -> dict:
    seeds = sorted(results)
    overall = [results[s]["report"]["overall"] for s in seeds]
    tasks = {}
    for task in results[seeds[0]]["report"]["tasks"] if seeds else []:
        k = sum(results[s]["report"]["tasks"][task]["correct"] for s in seeds)
        n = sum(results[s]["report"]["tasks"][task]["images"] for s in seeds)
        tasks[task] = {"accuracy": k / max(n, 1), "interval": list(wilson_interval(k, n))}
    loss = [loss_statistics(results[s]["losses"]) for s in seeds]
    row = {
        "arm": arm.name,
        "label": arm.label,
        "overrides": list(arm.overrides),
        "merge": {"last": arm.merge_last, "ema": arm.ema, "of": arm.run_name},
        "claimed": arm.claimed if control is not None else "control",
        "seeds": seeds,
        "overall": float(np.mean(overall)) if seeds else float("nan"),
        "overall_half": t_half_width(overall),
        "per_seed": dict(zip(map(str, seeds), overall)),
        "tasks": tasks,
        "final_loss": float(np.mean([f for f, _ in loss])) if seeds else float("nan"),
        "loss_spikes": float(np.mean([k for _, k in loss])) if seeds else float("nan"),
    }
    routed = [results[s]["routing"] for s in seeds if results[s]["routing"]]
    if routed:
        row["routing"] = {
            **{
                f"homogeneity_{k}": float(np.mean([r["homogeneity"][k] for r in routed]))
                for k in routed[0]["homogeneity"]
            },
            "timestep_variance_share": float(np.mean([r["variance_share"]["timestep"] for r in routed])),
        }
    if control is not None:
        paired = [s for s in seeds if s in control]
        diffs = [results[s]["report"]["overall"] - control[s]["report"]["overall"] for s in paired]
        row["paired_seeds"] = paired
        row["difference"] = float(np.mean(diffs)) if diffs else float("nan")
        row["difference_half"] = t_half_width(diffs)
        row["verdict"] = verdict(row["difference"], row["difference_half"], arm.claimed) if diffs else "no runs"
    return row


def summarize_claim(claim: Claim, arms: list[Arm], out: Path, seeds, command: str) -> dict:
    control = seed_results(out, arms[0], seeds)
    rows = [summarize_arm(arms[0], control, None)]
    rows += [summarize_arm(a, seed_results(out, a, seeds), control) for a in arms[1:]]
    summary = {"claim": claim.name, "statement": claim.statement, "command": command, "arms": rows}
    folder = out / claim.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "claim.json").write_text(json.dumps(summary, indent=1) + "\n")
    (folder / "claim.md").write_text(format_claim(summary) + "\n")
    losses: dict[str, list[list[float]]] = {}
    for arm in arms:  # one curve per training (the merge horizons share the control's)
        if arm.run_name not in {a.run_name for a in arms[: arms.index(arm)]}:
            losses[arm.label] = [r["losses"] for r in seed_results(out, arm, seeds).values()]
    claim_picture(rows, losses, folder / "claim.png")
    return summary


def _num(x: float, digits: int = 3) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def format_claim(summary: dict) -> str:
    rows = summary["arms"]
    tasks = list(rows[0]["tasks"]) if rows and rows[0]["tasks"] else []
    routing = any("routing" in r for r in rows)
    head = ["arm", "--set", "seeds", "overall (95% t)", "arm - control (95% paired t)", "verdict", *tasks]
    head += ["final loss", "loss spikes"]
    head += ["homogeneity shape / colour / region", "timestep variance share"] if routing else []
    lines = [f"**{summary['claim']}**: {summary['statement']}", "", "| " + " | ".join(head) + " |"]
    lines.append("|" + "---|" * len(head))
    for r in rows:
        sets = " ".join(f"`{o}`" for o in r["overrides"]) or "(the preset)"
        if r["merge"]["last"] or r["merge"]["ema"]:
            sets += f" merged: last {r['merge']['last'] or 'default'}{' EMA' if r['merge']['ema'] else ''}"
        cells = [r["label"], sets, str(len(r["seeds"])), f"{_num(r['overall'])} +- {_num(r['overall_half'])}"]
        if "difference" in r:
            cells += [f"{_num(r['difference'], 3)} +- {_num(r['difference_half'])}", r["verdict"]]
        else:
            cells += ["(control)", ""]
        cells += [_num(r["tasks"][t]["accuracy"], 2) for t in tasks]
        cells += [_num(r["final_loss"], 4), _num(r["loss_spikes"], 1)]
        if routing:
            g = r.get("routing", {})
            cells += [
                " / ".join(_num(g.get(f"homogeneity_{k}", float("nan"))) for k in ("shape", "color", "region")),
                _num(g.get("timestep_variance_share", float("nan"))),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Reproduce: `{summary['command']}`"]
    return "\n".join(lines)


PALETTE = [(30, 80, 200), (200, 60, 30), (40, 150, 60), (150, 60, 170), (220, 150, 20)]


def claim_picture(rows: list[dict], losses: dict[str, list[list[float]]], path: Path) -> Path:
    """Left: each arm's mean overall score with its 95% interval over seeds. Right: each trained arm's loss
    (mean over seeds, moving average, log scale)."""
    width, height = 1000, 420
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    # Scores.
    left, right, top, bottom = 60, 440, 40, height - 60
    values = [(r["overall"], r["overall_half"]) for r in rows]
    finite = [v + (h if math.isfinite(h) else 0) for v, h in values if math.isfinite(v)]
    hi = max(finite + [0.05]) * 1.1
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 10), "overall compositional score (95% t over seeds)", fill="black")
    for frac in (0.0, 0.5, 1.0):
        draw.text((5, bottom - (bottom - top) * frac - 6), f"{hi * frac:.3f}", fill="black")
    step = (right - left) / max(len(rows), 1)
    for i, (r, (v, h)) in enumerate(zip(rows, values)):
        x, colour = left + step * (i + 0.5), PALETTE[i % len(PALETTE)]
        if not math.isfinite(v):
            continue
        y = bottom - (bottom - top) * v / hi
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        if math.isfinite(h):
            y0, y1 = bottom - (bottom - top) * max(v - h, 0) / hi, bottom - (bottom - top) * min(v + h, hi) / hi
            draw.line([(x, y0), (x, y1)], fill=colour, width=2)
            draw.line([(x - 6, y0), (x + 6, y0)], fill=colour)
            draw.line([(x - 6, y1), (x + 6, y1)], fill=colour)
        draw.text((x - step / 2 + 4, bottom + 6 + 12 * (i % 2)), r["label"][:22], fill=colour)
    # Losses.
    left, right = 520, width - 20
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 10), "training loss (mean over seeds, moving average)", fill="black")
    curves = {}
    for label, runs in losses.items():
        if not runs:
            continue
        n = min(len(r) for r in runs)
        v = np.nanmean(np.array([r[:n] for r in runs], dtype=np.float64), axis=0)
        v = np.where(np.isfinite(v) & (v > 0), v, np.nanmedian(v))
        window = max(1, n // 50)
        curves[label] = np.convolve(v, np.ones(window) / window, mode="valid")
    if curves:
        lo = math.log10(min(c.min() for c in curves.values()))
        top_log = max(math.log10(max(c.max() for c in curves.values())), lo + 1e-3)
        steps = max(len(c) for c in curves.values())
        for frac in (0.0, 0.5, 1.0):
            draw.text(
                (left - 50, bottom - (bottom - top) * frac - 6),
                f"{10 ** (lo + frac * (top_log - lo)):.3f}",
                fill="black",
            )
        labels = [r["label"] for r in rows]
        for k, (label, c) in enumerate(curves.items()):
            colour = PALETTE[labels.index(label) % len(PALETTE)] if label in labels else (0, 0, 0)
            pts = [
                (
                    left + (right - left) * i / max(steps - 1, 1),
                    bottom - (bottom - top) * (math.log10(y) - lo) / (top_log - lo),
                )
                for i, y in enumerate(c)
            ]
            if len(pts) > 1:
                draw.line(pts, fill=colour, width=2)
            draw.text((left + 8, top + 6 + 12 * k), label, fill=colour)
        draw.text((right - 70, bottom + 6), f"step {steps}", fill="black")
    img.save(path)
    return path


# ---- entry points ----------------------------------------------------------------------------------------------
def prepare_prompts(data: Path, out: Path, per_task: int, routing_per_task: int) -> None:
    """OUT/prompts.jsonl and OUT/routing_prompts.jsonl: the first prompts of each held-out task, written once (a
    rerun with other counts would score other prompts than the runs already scored)."""
    for name, count in (("prompts.jsonl", per_task), ("routing_prompts.jsonl", routing_per_task)):
        text = "".join(json.dumps(r) + "\n" for r in heldout_records(data, count))
        file = out / name
        if file.exists() and file.read_text() != text:
            raise ValueError(f"{file} holds other prompts than --per-task/--routing-per-task give; use another --out")
        file.write_text(text)


def run_claims(cfg: ClaimsConfig, data: str | Path, out: str | Path, command: str, check_command=None) -> list[dict]:
    """Train and score what is missing, then write each claim's summary. `check_command(argv)` may refuse a
    planned `nucleus` command (a flag this version lacks) before anything runs. Raises when a run failed, after
    writing the summaries of what finished."""
    data, out = Path(data), Path(out)
    selected = select(cfg)
    check_arms(cfg, selected)
    if not data.is_dir():
        raise ValueError(f"--data {str(data)!r} is not a dataset folder (make one with `nucleus data synth`)")
    out.mkdir(parents=True, exist_ok=True)
    prepare_prompts(data, out, cfg.per_task, cfg.routing_per_task)
    plan = plan_runs(cfg, selected, data, out)
    for arm, _seed, commands in plan if check_command else ():
        for argv in commands:
            try:
                check_command(argv)
            except ValueError as err:
                raise ValueError(f"arm {arm.name}: {err}") from None
    failed = execute(plan, out, cfg.parallel)
    summaries = report(cfg, out, command)
    if failed:
        raise RuntimeError("runs failed:\n" + "\n".join(failed))
    return summaries


def report(cfg: ClaimsConfig, out: str | Path, command: str) -> list[dict]:
    return [
        summarize_claim(c, arms, Path(out), cfg.seeds, command.replace("{claim}", c.name)) for c, arms in select(cfg)
    ]


def write_doc(out: str | Path, doc: str | Path) -> Path:
    """DOC: every claim summarised under OUT, in CLAIMS order, each with its table, its reproducing command and its
    picture (copied to DOC's folder as claims-<name>.png)."""
    out, doc = Path(out), Path(doc)
    found = [json.loads((out / c / "claim.json").read_text()) for c in CLAIMS if (out / c / "claim.json").exists()]
    if not found:
        raise ValueError(f"no claim summaries under {str(out)!r} (OUT/<claim>/claim.json); run the claims first")
    doc.parent.mkdir(parents=True, exist_ok=True)
    parts = [
        "# The announcement's claims, in miniature",
        "",
        "Each claim below is a controlled comparison on the tiny preset (the control) against the preset with a "
        "few overrides, trained from the same seeds with the same steps and batch, merged, and scored on the "
        "held-out prompts with the compositional scorer. The difference is paired by seed, with a 95% Student t "
        "interval; the verdict reads that interval: reproduced (the claimed side, excluding 0), inverted (the "
        "other side, excluding 0), or not reproduced at this scale (including 0); an arm claimed to be no better than "
        f"the control is reproduced when its interval's upper end is within {NONINFERIORITY_MARGIN:g} of it. "
        "Homogeneity is the mean pairwise "
        "cosine similarity between the experts' mixes of shapes, colours and regions under the tokens they pick "
        "(1 = no specialisation).",
    ]
    for summary in found:
        picture = out / summary["claim"] / "claim.png"
        parts += ["", f"## {summary['claim']}", "", format_claim(summary)]
        if picture.exists():
            target = doc.parent / f"claims-{summary['claim']}.png"
            shutil.copyfile(picture, target)
            parts += ["", f"![{summary['claim']}]({target.name})"]
    doc.write_text("\n".join(parts) + "\n")
    return doc
