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

Modules: `arms` (the claims and the config), `runs` (planning and running the trainings), `summary` (intervals,
verdicts, tables, the document), `picture` (one picture per claim).
"""

from .arms import CLAIMS, CONTROL, KEEP_LAST, Arm, Claim, ClaimsConfig, check_arms, common_overrides, run_dir, select
from .picture import claim_picture
from .runs import EVAL_BATCH, SAMPLE_STEPS, execute, plan_runs, prepare_prompts, run_claims, run_commands
from .summary import (
    LOSS_TAIL,
    NONINFERIORITY_MARGIN,
    SPIKE_RATIO,
    SPIKE_WINDOW,
    format_claim,
    loss_statistics,
    report,
    seed_results,
    summarize_arm,
    summarize_claim,
    t_half_width,
    verdict,
    write_doc,
)

__all__ = [
    "CLAIMS",
    "CONTROL",
    "EVAL_BATCH",
    "KEEP_LAST",
    "LOSS_TAIL",
    "NONINFERIORITY_MARGIN",
    "SAMPLE_STEPS",
    "SPIKE_RATIO",
    "SPIKE_WINDOW",
    "Arm",
    "Claim",
    "ClaimsConfig",
    "check_arms",
    "claim_picture",
    "common_overrides",
    "execute",
    "format_claim",
    "loss_statistics",
    "plan_runs",
    "prepare_prompts",
    "report",
    "run_claims",
    "run_commands",
    "run_dir",
    "seed_results",
    "select",
    "summarize_arm",
    "summarize_claim",
    "t_half_width",
    "verdict",
    "write_doc",
]
