"""Compositional scoring: GenEval's rules over the synthetic shapes domain, with an exact detector
(`nucleus_image.eval.shape_detector`) in place of GenEval's Mask2Former and CLIP colour classifier.

    nucleus eval compositional --images OUT_DIR --out REPORT_DIR      # a GenEval-layout folder of samples
    nucleus eval compositional --model PIPELINE_DIR --out REPORT_DIR  # generate the held-out prompts, then score

Rules (GenEval's `evaluate_images.py`, detections most confident first): for each `include` entry, the first
`count` detections of its class must exist; if it names a colour, that many of them must have it; if it names a
position (relation, group), each of them must stand in that relation (GenEval's `relative_position`) to every
object matched by the referenced entry, which must itself have matched. Each `exclude` entry fails the image if
its class is detected `count` or more times. An image is correct only if every check holds. A task's accuracy is
the share of its images that are correct; the overall score is the mean of the task accuracies.

Folder layout read and written (what GenEval's scorer reads): `<dir>/<index:05d>/metadata.jsonl` (the prompt's
record, one line) and `<dir>/<index:05d>/samples/<k:04d>.png`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from nucleus_image.data.synthetic import COLORS, RELATIONS, SHAPES, TASKS, relative_position
from nucleus_image.eval.shape_detector import Detection, DetectorConfig, detect
from nucleus_image.progress import progress as progress_bar


def validate_records(records: list[dict]) -> None:
    """Refuse malformed metadata before any work, naming every bad value and what is accepted."""
    problems = []
    for i, rec in enumerate(records):
        where = f"record {i} ({rec.get('prompt', '?')!r})" if isinstance(rec, dict) else f"record {i}"
        if not isinstance(rec, dict) or not isinstance(rec.get("include"), list) or not rec["include"]:
            problems.append(f"{where}: needs a non-empty 'include' list")
            continue
        if rec.get("tag") not in TASKS:
            problems.append(f"{where}: tag {rec.get('tag')!r} not one of {list(TASKS)}")
        for kind in ("include", "exclude"):
            for j, entry in enumerate(rec.get(kind, [])):
                if entry.get("class") not in SHAPES:
                    problems.append(f"{where}: {kind}[{j}] class {entry.get('class')!r} not one of {list(SHAPES)}")
                if not isinstance(entry.get("count"), int) or entry["count"] < 1:
                    problems.append(f"{where}: {kind}[{j}] count {entry.get('count')!r} must be an integer >= 1")
                if "color" in entry and entry["color"] not in COLORS:
                    problems.append(f"{where}: {kind}[{j}] color {entry['color']!r} not one of {list(COLORS)}")
                if "position" in entry:
                    pos = entry["position"]
                    if (
                        not isinstance(pos, (list, tuple))
                        or len(pos) != 2
                        or pos[0] not in RELATIONS
                        or not isinstance(pos[1], int)
                        or not 0 <= pos[1] < j
                    ):
                        problems.append(
                            f"{where}: {kind}[{j}] position {pos!r} must be [relation, earlier include "
                            f"index] with relation in {list(RELATIONS)}"
                        )
    if problems:
        raise ValueError("invalid compositional metadata: " + "; ".join(problems))


def evaluate(record: dict, detections: list[Detection]) -> tuple[bool, list[str]]:
    """GenEval's per-image rule set on detections sorted most confident first. Returns (correct, reasons)."""
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.shape, []).append(det)
    correct, reasons, matched_groups = True, [], []
    for req in record["include"]:
        name, count = req["class"], req["count"]
        found = by_class.get(name, [])[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = [d.color for d in found]
                if colors.count(req["color"]) < count:
                    matched = False
                    reasons.append(f"expected {req['color']} {name}>={count}, found {colors}")
            if "position" in req and matched:
                rel, group = req["position"]
                if matched_groups[group] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {rel}")
                else:
                    for det in found:
                        for target in matched_groups[group]:
                            actual = relative_position(det.bbox, target.bbox)
                            if rel not in actual:
                                matched = False
                                reasons.append(f"expected {name} {rel} target, found {sorted(actual) or 'none'}")
                                break
                        if not matched:
                            break
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for req in record.get("exclude", []):
        n = len(by_class.get(req["class"], []))
        if n >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return correct, reasons


Z95 = 1.959963984540054


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial share (95% by default): unlike p +- z*sqrt(p(1-p)/n) it stays
    inside [0, 1] and does not collapse to zero width at 0 or n correct."""
    if n <= 0:
        return 0.0, 1.0
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def overall_interval(tasks: dict, z: float = Z95) -> tuple[float, float]:
    """95% interval of the mean of the task accuracies: normal, with each task's binomial variance (its Wilson
    centre keeps the variance positive at 0 or all correct), the tasks independent."""
    if not tasks:
        return 0.0, 1.0
    var = 0.0
    for t in tasks.values():
        lo, hi = wilson_interval(t["correct"], t["images"], z)
        centre = (lo + hi) / 2
        var += centre * (1 - centre) / t["images"]
    mean = float(np.mean([t["accuracy"] for t in tasks.values()]))
    half = z * np.sqrt(var) / len(tasks)
    return max(0.0, mean - half), min(1.0, mean + half)


def summarize(per_prompt: list[dict]) -> dict:
    """Task accuracies over images and the overall mean over the tasks present, as GenEval's summary prints, each
    with a 95% interval: Wilson over the task's images (`wilson_interval`), normal for the overall mean
    (`overall_interval`). Images are counted as independent draws, which holds for the seeds of one prompt and
    for tasks whose every combination is a prompt; where the prompts are a sample of the combinations, the
    interval leaves out the prompt draw's own variance."""
    tasks = {}
    for tag in TASKS:
        rows = [p for p in per_prompt if p["tag"] == tag and p["correct"]]
        if rows:
            flags = [c for p in rows for c in p["correct"]]
            tasks[tag] = {
                "accuracy": float(np.mean(flags)),
                "correct": int(sum(flags)),
                "images": len(flags),
                "prompts": len(rows),
                "interval": list(wilson_interval(int(sum(flags)), len(flags))),
            }
    flags = [c for p in per_prompt for c in p["correct"]]
    scored = [p for p in per_prompt if p["correct"]]
    return {
        "overall": float(np.mean([t["accuracy"] for t in tasks.values()])) if tasks else 0.0,
        "overall_interval": list(overall_interval(tasks)),
        "interval_method": "95%: Wilson score per task over images; normal for the mean of the tasks",
        "tasks": tasks,
        "tasks_missing": [t for t in TASKS if t not in tasks],
        "images": len(flags),
        "prompts": len(scored),
        "correct_images": float(np.mean(flags)) if flags else 0.0,
        "correct_prompts": float(np.mean([any(p["correct"]) for p in scored])) if scored else 0.0,
    }


def score(
    records: list[dict],
    images_per_prompt: list[list],
    config: DetectorConfig = DetectorConfig(),
    progress: bool = False,
) -> dict:
    """Score images (PIL images, paths or HxWx3 uint8 arrays), one list per record. A path that cannot be read
    is skipped and listed under `skipped`; the report holds per-task and overall accuracy plus, per prompt,
    each image's verdict, reasons and detections."""
    validate_records(records)
    if len(images_per_prompt) != len(records):
        raise ValueError(f"got image lists for {len(images_per_prompt)} prompts but {len(records)} metadata records")
    per_prompt, skipped = [], []
    total = sum(len(imgs) for imgs in images_per_prompt)
    bar = progress_bar(total=total, desc="scoring", unit="img", disable=not progress)
    for index, (rec, images) in enumerate(zip(records, images_per_prompt)):
        entry = {
            "index": index,
            "tag": rec["tag"],
            "prompt": rec.get("prompt", ""),
            "correct": [],
            "reasons": [],
            "detections": [],
        }
        for image in images:
            bar.update(1)
            try:
                dets = detect(image, config)
            except (OSError, SyntaxError) as err:  # PIL raises these for missing, truncated or non-image files
                skipped.append({"image": str(image), "reason": f"{type(err).__name__}: {err}"})
                continue
            ok, reasons = evaluate(rec, dets)
            entry["correct"].append(ok)
            entry["reasons"].append(reasons)
            entry["detections"].append([d.to_dict() for d in dets])
        per_prompt.append(entry)
    bar.close()
    report = summarize(per_prompt)
    report.update(
        {
            "rules": "GenEval (evaluate_images.py) with the exact synthetic-shapes detector",
            "skipped": skipped,
            "per_prompt": per_prompt,
        }
    )
    return report


def write_geneval_folder(folder: str | Path, records: list[dict], images_per_prompt: list[list[Image.Image]]) -> Path:
    """Write samples in GenEval's layout: <folder>/<index:05d>/{metadata.jsonl, samples/<k:04d>.png}."""
    folder = Path(folder)
    for index, (rec, images) in enumerate(zip(records, images_per_prompt)):
        sample_dir = folder / f"{index:05d}" / "samples"
        sample_dir.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:05d}" / "metadata.jsonl").write_text(json.dumps(rec) + "\n")
        for k, image in enumerate(images):
            image.save(sample_dir / f"{k:04d}.png")
    return folder


def read_geneval_folder(folder: str | Path) -> tuple[list[dict], list[list[Path]]]:
    """Records and sample paths of a GenEval-layout folder, in index order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images folder {str(folder)!r} does not exist")
    prompt_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    if not prompt_dirs:
        raise ValueError(
            f"{str(folder)!r} holds no GenEval-layout prompt folders (<index:05d>/metadata.jsonl "
            f"and <index:05d>/samples/<k:04d>.png)"
        )
    records, paths = [], []
    for d in prompt_dirs:
        meta = d / "metadata.jsonl"
        if not meta.exists():
            raise ValueError(f"prompt folder {str(d)!r} has no metadata.jsonl")
        try:
            records.append(json.loads(meta.read_text().splitlines()[0]))
        except (json.JSONDecodeError, IndexError) as err:
            raise ValueError(f"{str(meta)!r} does not hold a JSON metadata record: {err}") from err
        paths.append(sorted((d / "samples").glob("*.png")))
    return records, paths


def score_folder(folder: str | Path, config: DetectorConfig = DetectorConfig(), progress: bool = True) -> dict:
    records, paths = read_geneval_folder(folder)
    report = score(records, paths, config, progress=progress)
    report["images_folder"] = str(folder)
    return report


def generate_samples(
    pipeline,
    records: list[dict],
    folder: str | Path,
    samples: int = 4,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
    aspect: str = "1:1",
    batch_prompts: int = 4,
    progress: bool = True,
) -> Path:
    """Sample every record's prompt `samples` times with a NucleusPipeline and write GenEval's layout. Image k
    of prompt i uses a CPU generator seeded seed + i * samples + k, so each image reproduces on its own."""
    import torch

    validate_records(records)
    if samples < 1 or batch_prompts < 1:
        raise ValueError(f"samples ({samples}) and batch_prompts ({batch_prompts}) must be >= 1")
    folder = Path(folder)
    for start in progress_bar(range(0, len(records), batch_prompts), desc="sampling prompts", disable=not progress):
        chunk = records[start : start + batch_prompts]
        if all(_sampled(folder / f"{start + i:05d}", rec, samples) for i, rec in enumerate(chunk)):
            continue  # written by an earlier, interrupted run of the same job: a rerun continues
        gens = [
            torch.Generator("cpu").manual_seed(seed + (start + i) * samples + k)
            for i in range(len(chunk))
            for k in range(samples)
        ]
        images = pipeline(
            [r["prompt"] for r in chunk],
            num_images_per_prompt=samples,
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=guidance,
            aspect_ratio=aspect,
            progress=False,
        ).images
        per_prompt = [images[i * samples : (i + 1) * samples] for i in range(len(chunk))]
        for i, (rec, imgs) in enumerate(zip(chunk, per_prompt)):
            sample_dir = folder / f"{start + i:05d}" / "samples"
            sample_dir.mkdir(parents=True, exist_ok=True)
            (sample_dir.parent / "metadata.jsonl").write_text(json.dumps(rec) + "\n")
            for k, image in enumerate(imgs):
                image.save(sample_dir / f".{k:04d}.png.tmp", format="PNG")
                os.replace(sample_dir / f".{k:04d}.png.tmp", sample_dir / f"{k:04d}.png")
    return folder


def _sampled(prompt_dir: Path, record: dict, samples: int) -> bool:
    """Whether this prompt's images are all on disk; refuses a folder that holds another prompt there."""
    metadata = prompt_dir / "metadata.jsonl"
    if not metadata.exists():
        return False
    if json.loads(metadata.read_text()) != record:
        raise ValueError(f"{str(prompt_dir)!r} holds samples of another prompt; choose a new output folder")
    return all((prompt_dir / "samples" / f"{k:04d}.png").exists() for k in range(samples))


LEGEND = (
    "Each tile: the first sample of one held-out prompt, upscaled. Frame green = correct, red = wrong. "
    "Magenta boxes: what the detector found (colour, shape). Under the tile: the task, the prompt, and why "
    "the image failed (GenEval's rule that did not hold)."
)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + ([line] if line else [])


def annotate(
    image,
    detections: list[dict],
    correct: bool,
    cell: int = 160,
    prompt: str = "",
    reasons: list[str] | None = None,
    tag: str = "",
) -> Image.Image:
    """A tile: the image upscaled (nearest) with detection boxes and labels, framed green when correct and red
    when not, and under it the task, the prompt and the reasons it failed."""
    from PIL import ImageFont

    font = ImageFont.load_default(size=11)
    image = image if isinstance(image, Image.Image) else Image.open(image)
    image = image.convert("RGB")
    scale = cell / max(image.size)
    thumb = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.NEAREST)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text = _wrap(probe, f"[{tag}] {prompt}" if tag else prompt, font, cell)
    verdict = "correct" if correct else "; ".join(reasons or ["wrong"])
    failed = _wrap(probe, verdict, font, cell)
    line_h = 13
    canvas = Image.new("RGB", (cell + 8, cell + 12 + line_h * (len(text) + len(failed))), "white")
    frame = (40, 160, 60) if correct else (200, 40, 40)
    canvas.paste(Image.new("RGB", (cell + 8, cell + 8), frame), (0, 0))
    canvas.paste(thumb, (4, 4))
    draw = ImageDraw.Draw(canvas)
    for det in detections:
        x0, y0, x1, y1 = (4 + v * scale for v in det["bbox"])
        draw.rectangle((x0, y0, x1, y1), outline=(255, 0, 255))
        draw.text((x0 + 2, y0 + 1), f"{det['color']} {det['shape']}", fill=(0, 0, 0), font=font)
    y = cell + 10
    for line in text:
        draw.text((4, y), line, fill=(0, 0, 0), font=font)
        y += line_h
    for line in failed:
        draw.text((4, y), line, fill=frame, font=font)
        y += line_h
    return canvas


def write_report(
    report: dict, out: str | Path, images_per_prompt: list[list] | None = None, max_cells: int = 48
) -> Path:
    """report.json, plus detections.png (first sample of each prompt, annotated, under a legend) when images are
    given; prompts are taken round-robin over the tasks so every task shows."""
    from PIL import ImageFont

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "report.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(path)
    if images_per_prompt:
        by_task: dict[str, list] = {}
        for entry, images in zip(report["per_prompt"], images_per_prompt):
            if entry["correct"] and images:
                by_task.setdefault(entry["tag"], []).append((entry, images[0]))
        picked = [row for group in zip(*by_task.values()) for row in group][:max_cells] if by_task else []
        picked += [r for g in by_task.values() for r in g if r not in picked][: max_cells - len(picked)]
        cells = [
            annotate(
                img, e["detections"][0], e["correct"][0], prompt=e["prompt"], reasons=e["reasons"][0], tag=e["tag"]
            )
            for e, img in picked
        ]
        if cells:
            cols = 8
            cw, ch = cells[0].width, max(c.height for c in cells)
            font = ImageFont.load_default(size=12)
            probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
            summary = f"overall {report['overall']:.3f}: " + ", ".join(
                f"{t} {v['accuracy']:.2f}" for t, v in report["tasks"].items()
            )
            legend = _wrap(probe, summary, font, cols * cw - 8) + _wrap(probe, LEGEND, font, cols * cw - 8)
            top = 8 + 15 * len(legend)
            grid = Image.new("RGB", (cols * cw, top + -(-len(cells) // cols) * ch), "white")
            draw = ImageDraw.Draw(grid)
            for i, line in enumerate(legend):
                draw.text((4, 4 + 15 * i), line, fill=(0, 0, 0), font=font)
            for k, c in enumerate(cells):
                grid.paste(c, ((k % cols) * cw, top + (k // cols) * ch))
            grid.save(out / "detections.png")
    return path


def format_summary(report: dict) -> str:
    lines = [f"{'task':<14} {'accuracy':>8}  {'95% interval':>15}  correct/images"]
    for tag, t in report["tasks"].items():
        lo, hi = t.get("interval") or wilson_interval(t["correct"], t["images"])
        lines.append(f"{tag:<14} {t['accuracy']:>8.3f}  [{lo:.3f}, {hi:.3f}]  {t['correct']}/{t['images']}")
    lo, hi = report.get("overall_interval") or overall_interval(report["tasks"])
    lines.append(
        f"{'overall':<14} {report['overall']:>8.3f}  [{lo:.3f}, {hi:.3f}]  (mean of {len(report['tasks'])} tasks)"
    )
    lines.append("intervals: 95%, Wilson score per task over its images; overall: normal, from the tasks' variances")
    if report.get("skipped"):
        lines.append(f"skipped {len(report['skipped'])} unreadable images")
    return "\n".join(lines)
