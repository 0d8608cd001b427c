"""Compositional score of a pipeline with full-precision, int8 and fp8 transformer weights: same prompts, same
seeds, same scorer (the GenEval rules on the synthetic shapes domain). Issue 12's bar: the quantized embedded
default within 0.02 of the unquantized one.

    python benchmarks/quantized_score.py --model runs/demo/merged --prompts runs/demo/data/heldout_metadata.jsonl \
        --out runs/quantized_score [--samples 4 --steps 16]

Writes OUT/{full,int8,fp8}/ (images, report.json) and prints the overall and per-task scores with each quantized
variant's difference from full precision. Exits 1 when a difference exceeds --tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from nucleus_image.eval.compositional import TASKS, generate_samples, score_folder, write_report
from nucleus_image.pipeline import NucleusPipeline


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="pipeline folder")
    ap.add_argument("--prompts", default=None, help="GenEval metadata .jsonl (default: heldout_metadata(0, 24))")
    ap.add_argument("--out", required=True)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--tolerance", type=float, default=0.02)
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.prompts:
        records = [json.loads(line) for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    else:
        from nucleus_image.data.synthetic import heldout_metadata

        records = heldout_metadata(0, 24)
    reports = {}
    for variant in ("full", "int8", "fp8"):
        t0 = time.perf_counter()
        pipe = NucleusPipeline.from_pretrained(
            args.model, device="cpu", quantize=None if variant == "full" else variant
        )
        folder = generate_samples(
            pipe,
            records,
            Path(args.out) / variant / "images",
            args.samples,
            0,
            args.steps,
            4.0,
            "1:1",
            args.batch_size,
            progress=False,
        )
        reports[variant] = score_folder(folder, progress=False)
        write_report(reports[variant], Path(args.out) / variant)
        print(f"{variant}: overall {reports[variant]['overall']:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)

    tasks = [t for t in TASKS if t in reports["full"]["tasks"]]
    print(f"\n{'':6s} {'overall':>8s} " + " ".join(f"{t:>13s}" for t in tasks))
    failed = False
    for variant, report in reports.items():
        cells = [report["overall"]] + [report["tasks"].get(t, {}).get("accuracy", float("nan")) for t in tasks]
        print(f"{variant:6s} " + " ".join(f"{c:8.4f}" if i == 0 else f"{c:13.4f}" for i, c in enumerate(cells)))
        if variant != "full":
            diff = report["overall"] - reports["full"]["overall"]
            failed |= abs(diff) > args.tolerance
            print(
                f"{'':6s} {diff:+8.4f} vs full precision ({'within' if abs(diff) <= args.tolerance else 'OUTSIDE'} "
                f"{args.tolerance})"
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
