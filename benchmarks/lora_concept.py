"""LoRA teaches the embedded default a colour word it has never seen, without losing what it knew.

    python benchmarks/lora_concept.py --model runs/demo/merged --out runs/lora_concept [--steps 300] [--quantize int8]

1. Data: a fresh synthetic set (the demo's size and aspects, a new seed) whose captions call purple "blicket" in
   half of the images (the other half keep "purple", so both words stay grounded).
2. Before and after `nucleus finetune`-style LoRA training (Finetuner, rank 16, the recipe's optimizer and
   timesteps), the compositional scorer grades: the concept prompts (held-out "colors" and "color_attr" prompts
   naming purple, with the word replaced by "blicket"; the scorer checks for purple objects), and the original
   held-out prompts of every task (do old skills survive?).
Prints one table; writes OUT/data, OUT/run (checkpoints, adapter), OUT/eval/{before,after}-{concept,original}.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from nucleus_image.data.manifest import next_version_dir, read_manifest, write_shard
from nucleus_image.data.synthetic import SynthConfig, generate_dataset, heldout_metadata
from nucleus_image.eval.compositional import TASKS, generate_samples, score_folder
from nucleus_image.lora.finetune import FinetuneConfig, Finetuner, default_optimizer
from nucleus_image.pipeline import NucleusPipeline

NEW_WORD, MEANING = "blicket", "purple"


def concept_data(out: Path, num: int, seed: int) -> Path:
    """Synthesize `num` images, then a manifest version whose captions say NEW_WORD for MEANING in even rows."""
    generate_dataset(
        out, num, seed=seed, config=SynthConfig(size=64, aspect_ratios=("1:1", "4:3", "3:4")), progress=False
    )
    table = read_manifest(out)
    word = re.compile(rf"\b{MEANING}\b")
    captions = [
        [word.sub(NEW_WORD, c) for c in caps] if i % 2 == 0 else caps
        for i, caps in enumerate(table.column("captions").to_pylist())
    ]
    table = table.set_column(
        table.schema.get_field_index("captions"), "captions", pa.array(captions, pa.list_(pa.string()))
    )
    write_shard(
        table, next_version_dir(out) / "part-00000.parquet", {"derived": f"{MEANING} -> {NEW_WORD} in even rows"}
    )
    return out


def concept_records(per_task: int) -> list[dict]:
    records = [
        r
        for r in heldout_metadata(0, 10_000)
        if r["tag"] in ("colors", "color_attr") and any(e.get("color") == MEANING for e in r["include"])
    ][: per_task * 2]
    return [dict(r, prompt=re.sub(rf"\b{MEANING}\b", NEW_WORD, r["prompt"])) for r in records]


def evaluate(pipe, records, folder: Path, samples: int, steps: int) -> dict:
    generate_samples(pipe, records, folder, samples, 0, steps, 4.0, "1:1", 12, progress=False)
    return score_folder(folder, progress=False)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="the merged embedded default (pipeline folder)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--num", type=int, default=1200, help="images in the concept dataset")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--quantize", choices=("int8", "fp8"), default=None, help="QLoRA on 8-bit base weights")
    ap.add_argument("--per-task", type=int, default=8, help="held-out prompts per task in the evaluations")
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--sample-steps", type=int, default=16)
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    data = concept_data(out / "data", args.num, seed=4242)
    concept = concept_records(args.per_task)
    original = heldout_metadata(0, args.per_task)
    print(
        f"data: {args.num} images, {len(concept)} concept prompts (e.g. {concept[0]['prompt']!r}), "
        f"{len(original)} original prompts ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    scores = {}
    base = NucleusPipeline.from_pretrained(args.model, device="cpu", quantize=args.quantize)
    for name, records in (("concept", concept), ("original", original)):
        scores[("before", name)] = evaluate(
            base, records, out / "eval" / f"before-{name}", args.samples, args.sample_steps
        )
    print(
        f"before: concept {scores[('before', 'concept')]['overall']:.3f}, original "
        f"{scores[('before', 'original')]['overall']:.3f} ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    cfg = FinetuneConfig(
        model=str(Path(args.model).resolve()),
        data=str(data.resolve()),
        lora_rank=args.rank,
        quantize=args.quantize,
        steps=args.steps,
        batch_size=args.batch_size,
        optimizer=replace(default_optimizer(), lr=args.lr),
        checkpoint_every=max(1, args.steps // 3),
    )
    losses = Finetuner(cfg, out / "run", progress=False).train()
    k = min(20, len(losses))
    print(
        f"fine-tuned {args.steps} steps: mean loss {sum(losses[:k]) / k:.4f} (first {k}) -> "
        f"{sum(losses[-k:]) / k:.4f} (last {k}) ({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )

    tuned = NucleusPipeline.from_pretrained(args.model, device="cpu", quantize=args.quantize)
    tuned.load_lora(out / "run" / "adapter")
    for name, records in (("concept", concept), ("original", original)):
        scores[("after", name)] = evaluate(
            tuned, records, out / "eval" / f"after-{name}", args.samples, args.sample_steps
        )

    print(f"\n{'prompts':10s} {'when':7s} {'overall':>8s} " + " ".join(f"{t:>13s}" for t in TASKS))
    for name in ("concept", "original"):
        for when in ("before", "after"):
            report = scores[(when, name)]
            cells = [report["tasks"].get(t, {}).get("accuracy") for t in TASKS]
            print(
                f"{name:10s} {when:7s} {report['overall']:8.3f} "
                + " ".join(f"{c:13.3f}" if c is not None else f"{'':13s}" for c in cells)
            )
    summary = {f"{w}-{n}": scores[(w, n)]["overall"] for (w, n) in scores}
    (out / "summary.json").write_text(json.dumps({"scores": summary, "args": vars(args)}, indent=2) + "\n")
    print(f"total {time.perf_counter() - t0:.0f} s; summary in {out / 'summary.json'}")


if __name__ == "__main__":
    main()
