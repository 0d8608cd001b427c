"""`nucleus merge`: the Merge of Warmup-Stable-Merge: average a run's last checkpoints into a pipeline folder.

    nucleus merge runs/tiny --out runs/tiny/merged
    nucleus merge runs/tiny --last 6 --weights inverse-sqrt --out runs/tiny/merged
    nucleus merge runs/ema --ema --out runs/ema/merged

Coefficients c_j (oldest first, summing to 1): uniform 1/N, or inverse-sqrt c_j ~ 1/sqrt(N - j) (the newest
weighs most). The merge equals replaying the last updates scaled by the decay w_i = sum_{j>=i} c_j (see
nucleus_image.training.merge). The output loads with NucleusPipeline.from_pretrained.

--ema exports instead the moving average of the weights that a run trained with `--set ema_decay=D` kept, from its
newest checkpoint (the baseline the merge replaces).
"""

from __future__ import annotations

from nucleus_image.cli.arguments import add_threads_arg
from nucleus_image.training.merge import MERGE_WEIGHTS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="merge a run's last checkpoints into a pipeline folder (WSM)",
        description="Weighted average of the newest checkpoints of a training run.",
    )
    p.add_argument("run_dir", help="training run folder (holds checkpoints/ and train_config.json)")
    p.add_argument(
        "--last", type=int, default=None, help="how many of the newest checkpoints (default: the run's merge_last)"
    )
    p.add_argument(
        "--weights", choices=MERGE_WEIGHTS, default=None, help="coefficients (default: the run's merge_weights)"
    )
    p.add_argument(
        "--ema",
        action="store_true",
        help="export the EMA of the weights from the newest checkpoint instead of merging (runs with ema_decay > 0)",
    )
    p.add_argument("--out", required=True, help="pipeline folder to write")
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from nucleus_image.training.config import TrainConfig
    from nucleus_image.training.merge import export_ema, merge_run

    config_file = Path(args.run_dir) / "train_config.json"
    if not config_file.exists():
        raise ValueError(f"{args.run_dir!r} is not a training run folder (no train_config.json)")
    if args.ema:
        if args.last is not None or args.weights is not None:
            raise ValueError("--ema exports the newest checkpoint's EMA: --last and --weights do not apply")
        print(f"wrote {export_ema(args.run_dir, args.out)}")
        return 0
    cfg = TrainConfig.from_json(config_file)
    out = merge_run(args.run_dir, args.last or cfg.merge_last, args.weights or cfg.merge_weights, args.out)
    print(f"wrote {out}")
    return 0
