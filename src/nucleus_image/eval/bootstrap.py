"""95% intervals for compositional scores, by a bootstrap over prompts, paired across samplers.

The overall score is the mean over tasks of each task's share of correct images. Its uncertainty comes from which
prompts were drawn (and which seeds), so prompts are resampled with replacement within each task (stratified,
keeping every task's prompt count), all of a prompt's images together. Comparing samplers on the same prompts and
seeds, every sampler is scored on the same resampled prompts in each draw, so the interval of a difference or a
ratio is the paired one: what varies between prompts cancels.

    draws = bootstrap_overall([teacher_report, student_report])        # (2, draws) overall scores
    low, high = interval(draws[1] - draws[0])                          # the student's score change, 95%
"""

from __future__ import annotations

import numpy as np

DRAWS = 4000


def prompt_table(report: dict) -> tuple[list[str], np.ndarray]:
    """(task of each prompt, share of correct images per prompt) from a `compositional.score` report."""
    rows = [p for p in report["per_prompt"] if p["correct"]]
    return [p["tag"] for p in rows], np.array([np.mean(p["correct"]) for p in rows], dtype=np.float64)


def overall(tags: list[str], accuracy: np.ndarray) -> float:
    """Mean over tasks of the task's mean per-prompt accuracy (= its share of correct images when every prompt
    has the same number of images, as the benchmarks sample them)."""
    return float(np.mean([accuracy[[t == tag for t in tags]].mean() for tag in dict.fromkeys(tags)]))


def bootstrap_overall(reports: list[dict], draws: int = DRAWS, seed: int = 0) -> np.ndarray:
    """(len(reports), draws) overall scores on prompts resampled within each task, the same resample for every
    report (paired). The reports must score the same prompts in the same order."""
    tables = [prompt_table(r) for r in reports]
    tags = tables[0][0]
    if any(t != tags for t, _ in tables):
        raise ValueError("paired bootstrap needs reports of the same prompts in the same order")
    accuracy = np.stack([a for _, a in tables])  # (reports, prompts)
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero([t == tag for t in tags]) for tag in dict.fromkeys(tags)]
    out = np.zeros((len(reports), draws))
    for members in groups:
        picks = members[rng.integers(0, len(members), size=(draws, len(members)))]  # (draws, n_task)
        out += accuracy[:, picks].mean(axis=2)
    return out / len(groups)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` percentile interval of bootstrap draws."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)
