"""What the claims' finished runs say: per arm the scores, losses and routing over seeds, the paired difference
against the control with its 95% interval and the verdict, as JSON, a Markdown table and a document."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

from ..compositional import wilson_interval
from .arms import CLAIMS, Arm, Claim, ClaimsConfig, run_dir, select
from .picture import claim_picture

LOSS_TAIL = 50
SPIKE_RATIO, SPIKE_WINDOW = 1.5, 50
# How much better than the control an arm claimed "not better" may be and still count as no better: two points of
# the overall score, below the smallest gain the announcement reports (+3.2 points for merging).
NONINFERIORITY_MARGIN = 0.02


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


def report(cfg: ClaimsConfig, out: str | Path, command: str) -> list[dict]:
    return [
        summarize_claim(c, arms, Path(out), cfg.seeds, command.replace("{claim}", c.name)) for c, arms in select(cfg)
    ]


def write_doc(out: str | Path, doc: str | Path) -> Path:
    """DOC: every claim summarised under OUT, in CLAIMS order, each with its table, its reproducing command and its
    picture (copied to DOC's folder as <DOC's stem>-<name>.png, so two documents' pictures do not collide)."""
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
            target = doc.parent / f"{doc.stem}-{summary['claim']}.png"
            shutil.copyfile(picture, target)
            parts += ["", f"![{summary['claim']}]({target.name})"]
    doc.write_text("\n".join(parts) + "\n")
    return doc
