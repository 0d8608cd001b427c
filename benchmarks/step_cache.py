"""Step caches vs the uncached sampler: transformer work, wall time and compositional score, and the pick of the
defaults by a paired interval, confirmed on seeds not used to pick.

    python benchmarks/step_cache.py --model runs/demo/merged --prompts runs/demo/data/heldout_metadata.jsonl
    python benchmarks/step_cache.py --model runs/demo/merged --prompts ... --quick     # 2 prompts/task, 2 samples
    python benchmarks/step_cache.py --released --device cuda     # released preset, 1024 px, 50 steps, s/image

Every policy samples the same held-out prompts (all six GenEval tasks) with the same seeds, steps and guidance as
`make demo`'s evaluation (16 steps, CFG 4), `--samples` images per prompt (default 8), and is scored with the exact
shape detector. The score loss of a policy is the uncached score minus its score on the same prompts and seeds;
its 95% interval comes from a bootstrap over prompts, stratified by task and paired (both samplers scored on the
same resampled prompts: `nucleus_image.eval.bootstrap`). The pick, per policy family and overall: the largest
saving of block work whose loss has an upper bound (the interval's upper end) <= `--max-loss` (0.03). It is made
on the seeds of `--seed` and then confirmed on `--confirm-seed`, seeds the pick never saw: the uncached sampler and
each family's pick are sampled and scored again there, and the loss and interval printed are those.

Work is the share of the uncached sampler's block executions (fbcache always runs the first block, so a skipped
step still costs 1/num_layers of a forward); "forwards/image" is that share times the steps. Wall time is timed
apart from the quality run: one batch of `--batch-size` prompts (one image each, text encoding and decoding
included), every policy called once to warm up and then `--rounds` times, alternating, median per policy. PSNR
against the uncached sampler's image of the same prompt and seed measures how far a cache moves the images.

`--released` times the transformer part (latent output) of the released preset with random weights in bf16 at
1024x1024, 50 steps, CFG 4, with and without each default cache; quality there is not measured (random weights).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nucleus_image.eval.bootstrap import bootstrap_overall, interval  # noqa: E402
from nucleus_image.pipeline import NucleusPipeline  # noqa: E402
from nucleus_image.pipeline.step_cache import FBCacheConfig, TaylorSeerConfig  # noqa: E402

# The first block's residual changes by 0.1-0.3 of itself per step at 16 steps on the `make demo` model, hence the
# thresholds; TaylorSeer's warmup keeps the first, most-changing steps exact.
POLICIES = (
    [None]
    + [FBCacheConfig(threshold=t) for t in (0.05, 0.1, 0.15, 0.25)]
    + [
        TaylorSeerConfig(order=o, interval=n, warmup=w)
        for o, n, w in ((1, 2, 1), (2, 2, 1), (1, 3, 3), (1, 3, 2), (1, 3, 1), (2, 3, 1))
    ]
)
QUICK_POLICIES = [
    None,
    FBCacheConfig(),
    FBCacheConfig(threshold=0.25),
    TaylorSeerConfig(order=1, interval=2),
    TaylorSeerConfig(order=1, interval=3, warmup=1),
]
MAX_SCORE_LOSS = 0.03


def label(cache) -> str:
    if cache is None:
        return "uncached"
    if isinstance(cache, FBCacheConfig):
        return f"fbcache threshold={cache.threshold:g}" + (f" warmup={cache.warmup}" if cache.warmup != 1 else "")
    return f"taylorseer order={cache.order} interval={cache.interval} warmup={cache.warmup}"


class CachedSampler:
    """A pipeline call with a fixed cache policy that keeps each image's cache report."""

    def __init__(self, pipe: NucleusPipeline, cache):
        self.pipe, self.cache, self.reports = pipe, cache, []

    def __call__(self, *args, **kwargs):
        out = self.pipe(*args, cache=self.cache, **kwargs)
        self.reports += out.step_cache or []
        return out


def wall_times(pipe: NucleusPipeline, policies: list, prompts: list[str], args) -> list[float]:
    """Seconds per image of each policy on one batch of prompts (one image each), median of `args.rounds`
    rounds after a warmup call each; the policies alternate round by round, so a busy machine slows them alike."""
    from generate import time_interleaved

    def call(cache):
        return lambda: (
            pipe(
                prompts,
                generator=torch.Generator().manual_seed(args.seed),
                cache=cache,
                num_inference_steps=args.steps,
                guidance_scale=args.guidance,
                progress=False,
            ).images
        )

    times, _ = time_interleaved({k: call(cache) for k, cache in enumerate(policies)}, pipe.device, args.rounds)
    return [times[k] / len(prompts) for k in range(len(policies))]


def sample_and_score(
    pipe: NucleusPipeline, policies: list, records: list[dict], samples: int, seed: int, args, tmp: Path
) -> list[dict]:
    """Each policy's images of every prompt (seeds from `seed`), scored; the loss and its paired 95% interval
    against the first policy (uncached)."""
    from nucleus_image.eval.compositional import generate_samples, score_folder

    rows, reports = [], []
    for k, cache in enumerate(policies):
        sampler = CachedSampler(pipe, cache)
        folder = generate_samples(
            sampler,
            records,
            tmp / f"{seed}-{k}",
            samples,
            seed,
            args.steps,
            args.guidance,
            batch_prompts=args.batch_size,
            progress=False,
        )
        reports.append(score_folder(folder, progress=False))
        work = (sum(r["block_work"] for r in sampler.reports) / len(sampler.reports)) if sampler.reports else 1.0
        rows.append(
            {
                "policy": label(cache),
                "config": None if cache is None else cache.to_dict(),
                "cache": cache,
                "work": work,
                "forwards_per_image": work * args.steps,
                "score": reports[-1]["overall"],
                "psnr": mean_psnr(tmp / f"{seed}-0", folder),
                "tasks": {t: v["accuracy"] for t, v in reports[-1]["tasks"].items()},
            }
        )
        print(
            f"  seed {seed}: {rows[-1]['policy']}: work {work:.3f}, score {rows[-1]['score']:.3f}",
            file=sys.stderr,
            flush=True,
        )
    draws = bootstrap_overall(reports, seed=seed)
    for row, d in zip(rows, draws):
        row["loss"] = rows[0]["score"] - row["score"]
        row["loss_interval"] = interval(draws[0] - d)
    return rows


def pick(rows: list[dict], family=None) -> dict | None:
    """The largest saving (then the best score) whose loss's upper bound is within MAX_SCORE_LOSS."""
    ok = [
        r
        for r in rows[1:]
        if r["loss_interval"][1] <= MAX_SCORE_LOSS and (family is None or isinstance(r["cache"], family))
    ]
    return max(ok, key=lambda r: (1 / r["work"], r["score"])) if ok else None


def quality(args) -> None:
    from nucleus_image.cli.eval_compositional import load_records
    from nucleus_image.data.synthetic import heldout_metadata

    torch.set_num_threads(args.threads)
    per_task, samples = (2, 2) if args.quick else (args.per_task, args.samples)
    records = load_records(args.prompts) if args.prompts else heldout_metadata(0, per_task)
    if args.quick:  # the first `per_task` prompts of each task, so all six tasks stay in
        kept, counts = [], Counter()
        for record in records:
            if counts[record["tag"]] < per_task:
                kept.append(record)
                counts[record["tag"]] += 1
        records = kept
    pipe = NucleusPipeline.from_pretrained(args.model, device=args.device)
    policies = QUICK_POLICIES if args.quick else POLICIES
    print(
        f"# {args.model}: {len(records)} prompts x {samples} samples, {args.steps} steps, CFG {args.guidance}, "
        f"{pipe.transformer.config.num_layers} blocks, {pipe.device}, threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}; pick on seed {args.seed}, confirm on seed {args.confirm_seed}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        rows = sample_and_score(pipe, policies, records, samples, args.seed, args, Path(tmp))
        picks = [p for p in (pick(rows, FBCacheConfig), pick(rows, TaylorSeerConfig)) if p is not None]
        confirm = sample_and_score(
            pipe, [None] + [p["cache"] for p in picks], records, samples, args.confirm_seed, args, Path(tmp)
        )
    timing_prompts = [r["prompt"] for r in records[: args.batch_size]]
    for row, seconds in zip(rows, wall_times(pipe, policies, timing_prompts, args)):
        row["seconds_per_image"] = seconds
    print(f"\n## picking: seed {args.seed}, {len(records)} prompts x {samples} samples")
    print_table(rows, args.steps)
    print(f"\n## confirming on fresh seeds: seed {args.confirm_seed}")
    for row in confirm:
        row["seconds_per_image"] = next(r["seconds_per_image"] for r in rows if r["policy"] == row["policy"])
    print_table(confirm, args.steps)
    best = pick(rows)
    for row in confirm[1:]:
        held = row["loss_interval"][1] <= MAX_SCORE_LOSS
        print(
            f"pick{' (overall)' if best and row['policy'] == best['policy'] else ''}: {row['policy']}: "
            f"{1 / row['work']:.2f}x less block work; loss on fresh seeds {row['loss']:+.3f} "
            f"[{row['loss_interval'][0]:+.3f}, {row['loss_interval'][1]:+.3f}] "
            f"({'within' if held else 'ABOVE'} the {MAX_SCORE_LOSS} bound)"
        )
    if args.json:
        strip = lambda rs: [{k: v for k, v in r.items() if k != "cache"} for r in rs]  # noqa: E731
        Path(args.json).write_text(json.dumps({"pick": strip(rows), "confirm": strip(confirm)}, indent=1) + "\n")


def mean_psnr(reference: Path, folder: Path) -> float:
    """Mean PSNR (dB, 8-bit pixels) of a folder's samples against the same samples of the reference folder: how
    far the cache moved each image, independent of how good the model is (inf when identical)."""
    values = []
    for path in sorted(reference.glob("*/samples/*.png")):
        a = np.asarray(Image.open(path), dtype=np.float64)
        b = np.asarray(Image.open(folder / path.relative_to(reference)), dtype=np.float64)
        mse = float(((a - b) ** 2).mean())
        values.append(math.inf if mse == 0 else 10 * math.log10(255**2 / mse))
    return float(np.mean(values))


def print_table(rows: list[dict], steps: int) -> None:
    base = rows[0]
    tasks = list(base["tasks"])
    print(
        f"| policy | forwards/image | work saved | s/image | wall ratio | PSNR vs uncached | score | loss [95%] | "
        f"{' | '.join(tasks)} |"
    )
    print("|" + "---|" * (8 + len(tasks)))
    for r in rows:
        scores = " | ".join(f"{r['tasks'].get(t, 0.0):.3f}" for t in tasks)
        lo, hi = r["loss_interval"]
        loss = "-" if r is base else f"{r['loss']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        print(
            f"| {r['policy']} | {r['forwards_per_image']:.2f} / {steps} | {1 / r['work']:.2f}x | "
            f"{r['seconds_per_image']:.3f} | {base['seconds_per_image'] / r['seconds_per_image']:.2f}x | "
            f"{r['psnr']:.1f} dB | {r['score']:.3f} | {loss} | {scores} |"
        )


def released(args) -> list[dict]:
    """Seconds per image of the released preset, with and without each policy's default config (rows of policy,
    seconds, speedup, full steps; printed as a table too)."""
    from generate import stand_in_vae, text_inputs
    from transformer_forward import build_models

    from nucleus_image.encoders.qwen_image import QwenImageAutoencoder
    from nucleus_image.model import NucleusConfig

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = NucleusConfig.preset(args.preset)
    _, transformer = build_models(cfg, device, dtype)
    pipe = NucleusPipeline(transformer, QwenImageAutoencoder(stand_in_vae(cfg.latent_channels, device, dtype)))
    size, steps = args.size, args.released_steps
    latents = torch.randn(1, (size // 16) ** 2, cfg.in_channels, generator=torch.Generator().manual_seed(2))
    common = dict(
        guidance_scale=4.0,
        height=size,
        width=size,
        num_inference_steps=steps,
        output_type="latent",
        progress=False,
        **text_inputs(cfg, 1, 128, device, dtype),
    )
    print(
        f"# {args.preset} preset, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, {dtype}, "
        f"{size}x{size}, {steps} steps, CFG 4, batch 1, latent output, random weights, torch {torch.__version__}"
    )
    print("| policy | s/image | speedup | full steps (cond/uncond) |\n|---|---|---|---|")
    base, rows = None, []
    for cache in (None, FBCacheConfig(), TaylorSeerConfig()):
        with torch.inference_mode():
            pipe(**common, latents=latents, cache=cache)  # warmup
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = pipe(**common, latents=latents, cache=cache)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        base = base or seconds
        full = "/".join(str(v) for v in out.step_cache[0]["full_steps"].values()) if out.step_cache else f"{steps}"
        print(f"| {label(cache)} | {seconds:.2f} | {base / seconds:.2f}x | {full} |", flush=True)
        rows.append({"policy": label(cache), "seconds": seconds, "speedup": base / seconds, "full_steps": full})
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="runs/demo/merged", help="pipeline folder (default: the make demo model)")
    ap.add_argument("--prompts", default=None, help="GenEval metadata .jsonl (default: heldout_metadata(0, 24))")
    ap.add_argument("--per-task", type=int, default=24, help="held-out prompts per task without --prompts")
    ap.add_argument("--samples", type=int, default=8, help="images per prompt")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0, help="first seed of the set the defaults are picked on")
    ap.add_argument(
        "--confirm-seed", type=int, default=1_000_000, help="first seed of the fresh set the picks are confirmed on"
    )
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds of the wall-time batch per policy")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true", help="2 prompts per task, 2 samples, 5 policies")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--released", action="store_true", help="time the released preset at 1024 px, 50 steps")
    ap.add_argument(
        "--preset",
        default="released",
        choices=["tiny", "small", "released"],
        help="with --released: the preset to time (a smaller one checks the command on a CPU)",
    )
    ap.add_argument("--size", type=int, default=1024, help="with --released: image side in pixels")
    ap.add_argument("--released-steps", type=int, default=50, help="with --released: denoising steps")
    args = ap.parse_args(argv)
    if args.released:
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        released(args)
    else:
        quality(args)


if __name__ == "__main__":
    main()
