"""The few-step student against its teacher: transformer rows per image, wall time and compositional score with 95%
intervals, in one run, plus a picture grid of both on the same seeds.

    python benchmarks/distill.py --model runs/demo/merged --adapter runs/distill/adapter --out runs/distill/bench

Without --prompts the prompts are the synthetic domain's held-out GenEval prompts, up to --per-task (24) per task:
111 over the six tasks (`make demo`'s heldout_metadata.jsonl holds 597 lines, 279 distinct prompts, for its own
scoring: pass it as --prompts for the larger set).

Arms, every one on the same held-out prompts (all six GenEval tasks) and the same seeds (image k of prompt i uses
seed + i * samples + k, as `nucleus eval compositional` does): the teacher as `make demo` samples (16 steps, CFG 4:
two rows per step); the student (the model with the adapter merged, no guidance: one row per step) at 1, 2, 4 and
8 steps; and, for reference, the base model cut to 4 steps with and without guidance. Rows are counted by a hook
on the transformer. Wall time: one batch of `--timing-prompts` prompts (one image each, text encoding and decoding
included) per arm, every arm called once to warm up, then `--rounds` rounds with the arms alternating, median per
arm, so a busy machine slows them alike. Scores: a bootstrap over prompts (stratified by task, paired across arms,
`nucleus_image.eval.bootstrap`) gives each overall score's 95% interval and those of the student/teacher ratio and
difference. Writes OUT/report.json, OUT/grid.png (rows: prompts; columns: arms) and OUT/images/ (GenEval layout
per arm; a rerun continues an interrupted one).

`--cost` predicts the distillation's wall time against the `make demo` training's on the same machine: in one
process, one thread, interleaved (so load slows all alike), it times the demo recipe's training step (tiny preset,
batch 64, flow loss, backward, Muon + AdamW) at its two stage resolutions, the distillation's own step, one batch
of teacher trajectories and one caption's encoding, and adds them up by the two runs' plans.

The released preset's seconds per 1024x1024 image (teacher 50 steps with CFG against a 4-step student) is a row
of `benchmarks/gpu_suite.py` (`check_few_step_student`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from nucleus_image.eval.bootstrap import bootstrap_overall, interval  # noqa: E402
from nucleus_image.pipeline import NucleusPipeline  # noqa: E402

TEACHER = ("teacher", 16, 4.0)


def arms(teacher_steps: int, teacher_guidance: float, student_steps: list[int], reference_steps: int) -> list[dict]:
    out = [
        {
            "name": f"teacher {teacher_steps} steps, CFG {teacher_guidance:g}",
            "pipe": "base",
            "steps": teacher_steps,
            "guidance": teacher_guidance,
        }
    ]
    out += [
        {"name": f"student {k} step{'s' if k > 1 else ''}", "pipe": "student", "steps": k, "guidance": 1.0}
        for k in student_steps
    ]
    out += [
        {
            "name": f"base {reference_steps} steps, CFG {teacher_guidance:g}",
            "pipe": "base",
            "steps": reference_steps,
            "guidance": teacher_guidance,
        },
        {
            "name": f"base {reference_steps} steps, no guidance",
            "pipe": "base",
            "steps": reference_steps,
            "guidance": 1.0,
        },
    ]
    return out


class RowCounter:
    """Transformer rows (batch entries of each forward) seen since the last reset."""

    def __init__(self, transformer):
        self.rows = 0
        transformer.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, _module, _args, kwargs, _out):
        self.rows += kwargs["hidden_states"].shape[0]


def load_records(path: str | None, per_task: int) -> list[dict]:
    from nucleus_image.cli.eval_compositional import load_records as read
    from nucleus_image.data.synthetic import heldout_metadata

    return read(path) if path else heldout_metadata(0, per_task)


def quality(args) -> None:
    from generate import time_interleaved

    from nucleus_image.eval.compositional import generate_samples, score_folder

    torch.set_num_threads(args.threads)
    records = load_records(args.prompts, args.per_task)
    pipes = {
        "base": NucleusPipeline.from_pretrained(args.model, device=args.device),
        "student": NucleusPipeline.from_pretrained(args.model, device=args.device).load_lora(args.adapter),
    }
    pipes["student"].merge_lora()  # the deployed student: the base model's cost per row
    counters = {key: RowCounter(p.transformer) for key, p in pipes.items()}
    plan = arms(args.teacher_steps, args.teacher_guidance, args.student_steps, args.reference_steps)
    out = Path(args.out)
    claim(
        out,
        {
            "model": str(Path(args.model).resolve()),
            "adapter": adapter_identity(args.adapter),
            "prompts": [r["prompt"] for r in records],
            "samples": args.samples,
            "seed": args.seed,
            "arms": plan,
        },
    )
    print(
        f"# {args.model} + {args.adapter}: {len(records)} prompts x {args.samples} samples, seed {args.seed}, "
        f"{pipes['base'].device}, threads {torch.get_num_threads()}, torch {torch.__version__}",
        flush=True,
    )
    reports = []
    for k, arm in enumerate(plan):
        counter = counters[arm["pipe"]]
        counter.rows = 0
        folder = out / "images" / f"{k:02d}"
        start = time.perf_counter()
        generate_samples(
            pipes[arm["pipe"]],
            records,
            folder,
            args.samples,
            args.seed,
            arm["steps"],
            arm["guidance"],
            batch_prompts=args.batch_size,
            progress=False,
        )
        arm["rows_per_image"] = counter.rows / (len(records) * args.samples) if counter.rows else None
        reports.append(score_folder(folder, progress=False))
        arm["score"] = reports[-1]["overall"]
        arm["tasks"] = {t: v["accuracy"] for t, v in reports[-1]["tasks"].items()}
        print(
            f"  {arm['name']}: score {arm['score']:.3f} ({time.perf_counter() - start:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    if any(a["rows_per_image"] is None for a in plan):  # images from an earlier run: count on one prompt
        for arm in plan:
            counter = counters[arm["pipe"]]
            counter.rows = 0
            pipes[arm["pipe"]](
                [records[0]["prompt"]],
                num_inference_steps=arm["steps"],
                guidance_scale=arm["guidance"],
                progress=False,
                output_type="latent",
            )
            arm["rows_per_image"] = counter.rows

    draws = bootstrap_overall(reports, seed=args.seed)
    for arm, d in zip(plan, draws):
        arm["score_interval"] = interval(d)
        arm["ratio_to_teacher"] = arm["score"] / plan[0]["score"] if plan[0]["score"] else None
        arm["ratio_interval"] = interval(d / np.maximum(draws[0], 1e-12))
        arm["difference_interval"] = interval(d - draws[0])

    timing = [r["prompt"] for r in records[: args.timing_prompts]]

    def call(arm):
        pipe = pipes[arm["pipe"]]
        return lambda: (
            pipe(
                timing,
                num_inference_steps=arm["steps"],
                guidance_scale=arm["guidance"],
                generator=torch.Generator().manual_seed(args.seed),
                progress=False,
            ).images
        )

    with torch.inference_mode():
        times, _ = time_interleaved({k: call(arm) for k, arm in enumerate(plan)}, pipes["base"].device, args.rounds)
    for k, arm in enumerate(plan):
        arm["seconds_per_image"] = times[k] / len(timing)
    print_table(plan, len(records), args.samples)
    grid(out / "images", plan, records, out / "grid.png", args.grid_per_task)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(
        json.dumps(
            {
                "model": args.model,
                "adapter": args.adapter,
                "prompts": len(records),
                "samples": args.samples,
                "seed": args.seed,
                "threads": torch.get_num_threads(),
                "arms": plan,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"grid: {out / 'grid.png'}  report: {out / 'report.json'}")


def adapter_identity(adapter: str) -> dict:
    import hashlib

    folder = Path(adapter).resolve()
    return {
        "path": str(folder),
        "sha256": hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest(),
    }


def claim(out: Path, job: dict) -> None:
    """OUT/images/ is reused by a rerun of the same job only: another model, adapter, prompt set or seed is refused."""
    out.mkdir(parents=True, exist_ok=True)
    job_file = out / "job.json"
    if job_file.exists() and json.loads(job_file.read_text()) != json.loads(json.dumps(job)):
        raise SystemExit(f"{out} holds another benchmark run ({job_file}); choose a new --out")
    job_file.write_text(json.dumps(job, indent=1) + "\n")


def print_table(plan: list[dict], prompts: int, samples: int) -> None:
    teacher = plan[0]
    tasks = list(teacher["tasks"])
    print(f"\n{prompts} prompts x {samples} samples; intervals: 95%, bootstrap over prompts (paired)\n")
    print(
        f"| sampler | rows/image | fewer rows | s/image | wall ratio | overall [95%] | / teacher [95%] | "
        f"{' | '.join(tasks)} |"
    )
    print("|" + "---|" * (7 + len(tasks)))
    for a in plan:
        lo, hi = a["score_interval"]
        rlo, rhi = a["ratio_interval"]
        per_task = " | ".join(f"{a['tasks'].get(t, 0.0):.3f}" for t in tasks)
        ratio = "-" if a is teacher else f"{a['ratio_to_teacher']:.2f} [{rlo:.2f}, {rhi:.2f}]"
        print(
            f"| {a['name']} | {a['rows_per_image']:g} | {teacher['rows_per_image'] / a['rows_per_image']:.1f}x | "
            f"{a['seconds_per_image']:.4f} | {teacher['seconds_per_image'] / a['seconds_per_image']:.2f}x | "
            f"{a['score']:.3f} [{lo:.3f}, {hi:.3f}] | {ratio} | "
            f"{per_task} |"
        )


def grid(images: Path, plan: list[dict], records: list[dict], path: Path, per_task: int, cell: int = 96) -> None:
    """Rows: the first `per_task` prompts of each task; columns: the arms; each cell the prompt's first sample."""
    picked, seen = [], {}
    for i, rec in enumerate(records):
        if seen.get(rec["tag"], 0) < per_task:
            picked.append(i)
            seen[rec["tag"]] = seen.get(rec["tag"], 0) + 1
    label_w, head_h = 260, 34
    canvas = Image.new("RGB", (label_w + cell * len(plan), head_h + cell * len(picked)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, arm in enumerate(plan):
        x = label_w + c * cell
        for line, text in enumerate(_wrap(arm["name"], 16)[:2]):
            draw.text((x + 3, 2 + 14 * line), text, fill="black")
    for r, i in enumerate(picked):
        y = head_h + r * cell
        for line, text in enumerate(_wrap(f"{records[i]['tag']}: {records[i]['prompt']}", 40)[:5]):
            draw.text((4, y + 4 + 14 * line), text, fill="black")
        for c in range(len(plan)):
            tile = Image.open(images / f"{c:02d}" / f"{i:05d}" / "samples" / "0000.png").convert("RGB")
            canvas.paste(tile.resize((cell - 4, cell - 4), Image.NEAREST), (label_w + c * cell + 2, y + 2))
    canvas.save(path)


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def cost(args) -> None:
    """Seconds of the distillation against the demo's training, both from per-step times measured interleaved."""
    import shutil
    import tempfile

    from generate import time_interleaved

    from nucleus_image.cli.distill import teacher_caption_weights
    from nucleus_image.data.manifest import read_manifest
    from nucleus_image.distill import DistillConfig, Distiller
    from nucleus_image.distill.trajectories import packed_noise, shard_captions, teacher_states
    from nucleus_image.model import NucleusTransformer
    from nucleus_image.pipeline.pipeline import pack_latents
    from nucleus_image.training.config import TrainConfig
    from nucleus_image.training.curriculum import caption_probabilities
    from nucleus_image.training.loss import FlowBatch, FlowObjective
    from nucleus_image.training.optim import build_optimizers
    from nucleus_image.training.step import train_step

    torch.set_num_threads(args.threads)
    fields = json.loads(args.config)
    fields.setdefault("caption_weights", teacher_caption_weights(Path(args.model)))  # as `nucleus distill` does
    planned = DistillConfig.from_dict(
        {
            "model": str(Path(args.model).resolve()),
            "data": str(Path(args.data).resolve()),
            "cpu_threads": args.threads,
            **fields,
        }
    )
    demo = TrainConfig.preset("tiny")
    tmp = Path(tempfile.mkdtemp(prefix="distill-cost-"))
    try:
        # A run of the same config with one batch of trajectories: its step is the step being predicted.
        distiller = Distiller(
            DistillConfig.from_dict({**planned.to_dict(), "trajectories": planned.batch_size}),
            tmp / "run",
            progress=False,
        )
        store = distiller.store
        model = NucleusTransformer(demo.model)
        muon, adamw, _ = build_optimizers(model, demo.optimizer, torch.float32)
        g = torch.Generator().manual_seed(0)

        objective = FlowObjective(demo.model.patch_size, demo.z_loss_weight)

        def demo_step(stage):  # the trainer's step on random latents and text states of the stage's shape
            side = stage.resolution // 2  # pixel autoencoder latents: 12 channels per 2 x 2 pixels
            x0 = pack_latents(torch.randn(stage.batch_size, 12, side, side, generator=g), 2)
            text = torch.randn(stage.batch_size, 16, demo.model.joint_attention_dim, generator=g)
            batch = FlowBatch(
                x0,
                torch.randn(x0.shape, generator=g),
                torch.rand(stage.batch_size, generator=g),
                text,
                None,
                (side, side),
            )
            return lambda: train_step(model, [muon, adamw], [batch], objective, demo.optimizer, 10_000)

        def distill_step():  # the run's own step, without advancing its state
            train_step(
                distiller.model,
                list(distiller.optimizers.values()),
                [distiller._micro_batch()],
                distiller.objective,
                planned.optimizer,
                distiller.step,
                params=list(distiller.adapters.values()),
            )

        captions = (store.captions * planned.teacher_batch_size)[: planned.teacher_batch_size]
        noise = packed_noise(distiller.pipe, store.plan, 0, len(captions))

        def teacher_batch():
            distiller.model.eval()
            teacher_states(distiller.pipe, store.plan, distiller.text, captions, noise, len(captions))
            distiller.model.train()

        encoder = distiller.pipe.text_encoder
        fns = {f"demo step {s.name}": demo_step(s) for s in demo.stages}
        fns.update(
            {
                "distill step": distill_step,
                f"teacher batch of {len(captions)}": teacher_batch,
                "one caption's encoding": lambda: encoder.encode_unique([captions[0]]),
            }
        )
        times, _ = time_interleaved(fns, torch.device("cpu"), args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    rows = [[c for c in caps if c] for caps in read_manifest(args.data).column("captions").to_pylist()]
    weights = np.array([float(bool(c)) for c in rows])
    plan = store.plan.__class__(
        **{
            **store.plan.to_dict(),
            "trajectories": planned.trajectories,
            "student_sigmas": store.plan.student_sigmas,
            "caption_weights": tuple(planned.caption_weights),
        }
    )
    distill_captions = len({c for k in range(plan.num_shards) for c in shard_captions(plan, k, rows, weights)})
    demo_captions = len(
        {c for caps in rows for c, p in zip(caps, caption_probabilities(demo.caption_weights, len(caps))) if p > 0}
    )
    caption_s = times["one caption's encoding"]
    demo_parts = {f"{demo_captions} captions encoded": demo_captions * caption_s}
    demo_parts.update({f"{s.steps} steps at {s.name}": s.steps * times[f"demo step {s.name}"] for s in demo.stages})
    parts = {
        f"{distill_captions} captions encoded": distill_captions * caption_s,
        f"{planned.trajectories} teacher trajectories": planned.trajectories
        / len(captions)
        * times[f"teacher batch of {len(captions)}"],
        f"{planned.steps} student steps of {planned.batch_size}": planned.steps * times["distill step"],
    }
    print(f"# one process, {torch.get_num_threads()} thread(s), median of {args.rounds} interleaved rounds")
    for name, t in times.items():
        print(f"  {name}: {t:.4f} s")
    for title, items in (("demo training (tiny preset's plan)", demo_parts), ("distillation", parts)):
        print(f"{title}: {sum(items.values()):.0f} s = " + " + ".join(f"{t:.0f} s ({n})" for n, t in items.items()))
    ratio = sum(parts.values()) / sum(demo_parts.values())
    print(f"ratio distillation / demo training: {ratio:.2f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", default="runs/demo/merged", help="teacher pipeline folder (default: the make demo model)"
    )
    ap.add_argument("--adapter", default="runs/distill/adapter", help="the student's adapter (nucleus distill)")
    ap.add_argument("--prompts", default=None, help="GenEval metadata .jsonl (default: heldout_metadata(0, 24))")
    ap.add_argument("--per-task", type=int, default=24, help="held-out prompts per task without --prompts")
    ap.add_argument("--samples", type=int, default=8, help="images per prompt (default 8)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-steps", type=int, default=TEACHER[1])
    ap.add_argument("--teacher-guidance", type=float, default=TEACHER[2])
    ap.add_argument(
        "--student-steps",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 2, 4, 8],
        help="comma-separated step counts of the student (default 1,2,4,8)",
    )
    ap.add_argument("--reference-steps", type=int, default=4, help="the base model's reference arms' steps")
    ap.add_argument("--batch-size", type=int, default=12, help="prompts per pipeline call")
    ap.add_argument("--timing-prompts", type=int, default=12, help="prompts in the timed batch")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per arm")
    ap.add_argument("--grid-per-task", type=int, default=2, help="prompts per task in the picture grid")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default="runs/distill/bench", help="output folder (images, grid.png, report.json)")
    ap.add_argument("--cost", action="store_true", help="predict the distillation's time against the demo training's")
    ap.add_argument("--data", default="runs/demo/data", help="with --cost: the dataset distilled on")
    ap.add_argument(
        "--config", default="{}", help="with --cost: distill config fields as JSON, e.g. '{\"steps\": 400}'"
    )
    args = ap.parse_args(argv)
    if args.cost:
        cost(args)
    else:
        quality(args)


if __name__ == "__main__":
    main()
