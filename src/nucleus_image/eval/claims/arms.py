"""The claims and their arms: each claim a control (the tiny preset) and arms that differ from it by a few `--set`
overrides, and the config that picks claims, arms, seeds and steps for `nucleus ablate claims`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
            "Expert-choice routing beats token-choice routing (top-2 or top-4 with a load-balancing loss) at the "
            "same expert capacity.",
            _control("expert choice"),
            (
                Arm(
                    "token_choice",
                    "token choice, top 2",
                    ("model.router_type=token_choice", "model.router_top_k=2", "load_balance_weight=0.01"),
                ),
                # Top 2 fills at most half of the control's slots in its CF 4 stage (expert choice fills all C x E
                # of them); top 4 asks for as many picks as expert choice makes there, and is capped at the same
                # C slots per expert in the CF 2 stage, so its filled slots never fall short of the control's.
                Arm(
                    "token_choice_top4",
                    "token choice, top 4",
                    ("model.router_type=token_choice", "model.router_top_k=4", "load_balance_weight=0.01"),
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
    from ...training.config import TrainConfig

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
    from ...training.config import TrainConfig

    for claim, arms in selected:
        for arm in arms:
            try:
                TrainConfig.preset("tiny").override(common_overrides(cfg, 0) + list(arm.overrides))
            except ValueError as err:
                raise ValueError(
                    f"claim {claim.name}, arm {arm.name} (--set {' --set '.join(arm.overrides)}): {err}"
                ) from None


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / name / f"seed{seed}"
