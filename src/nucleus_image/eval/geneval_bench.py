"""GenEval benchmark runner: sample the 553 GenEval prompts into the folder layout GenEval's official scorer
(`evaluate_images.py`) reads, resumably, with every image's seed recorded.

    nucleus bench geneval --model NucleusAI/NucleusMoE-Image-folder --out bench/geneval   # then score elsewhere
    nucleus bench geneval --model runs/tiny/merged --out bench/tiny                       # synthetic: scored here

Layout: OUT/<index:05d>/metadata.jsonl (the prompt's GenEval record, one line), OUT/<index:05d>/samples/<k:04d>.png,
plus OUT/<index:05d>/seeds.json ({image name: seed}; GenEval's scorer ignores it) and OUT/bench.json (the settings).
Image k of prompt i is drawn with a CPU generator seeded `seed + i * samples + k`, so any image reproduces on its
own, and a run that was stopped resumes by generating only the images not yet written (each PNG is written to a
temporary name and renamed, so a half-written file never counts as done). Resuming with different generation
settings is refused.

The prompts ship with the package (`data/geneval_evaluation_metadata.jsonl`, MIT, GenEval's LICENSE beside it).
A synthetic-domain model (the pixel autoencoder) cannot draw COCO objects: by default it is given the synthetic
held-out prompts instead, and its images are scored here with the compositional scorer.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from nucleus_image.progress import progress as progress_bar

GENEVAL_PROMPTS = "geneval_evaluation_metadata.jsonl"
GENEVAL_LICENSE = "GENEVAL_LICENSE"
NUM_GENEVAL_PROMPTS = 553
# Settings that change the images: resuming with any of them different would mix two benchmarks in one folder.
GENERATION_KEYS = ("prompts_sha256", "samples", "seed", "steps", "guidance", "width", "height", "model")


def packaged_file(name: str) -> Path:
    return Path(str(resources.files("nucleus_image.eval") / "data" / name))


def read_prompts(path: str | Path | None = None) -> list[dict]:
    """GenEval-format records (tag, include, prompt, ...) from a .jsonl; the packaged 553 by default."""
    path = Path(path) if path is not None else packaged_file(GENEVAL_PROMPTS)
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number} is not JSON: {err}") from err
        if (
            not isinstance(record, dict)
            or not isinstance(record.get("prompt"), str)
            or "tag" not in record
            or not isinstance(record.get("include"), list)
        ):
            raise ValueError(f"{path}:{number} is not a GenEval record (needs 'tag', 'include' and a 'prompt' string)")
        records.append(record)
    if not records:
        raise ValueError(f"prompt file {str(path)!r} holds no records")
    return records


def is_synthetic_domain(model_dir: str | Path) -> bool:
    """A model of the synthetic shapes domain: its pipeline decodes with the pixel autoencoder."""
    from nucleus_image.pipeline.folder import read_index

    return read_index(Path(model_dir)).get("vae", [None, None])[1] == "PixelAutoencoder"


def scorable_here(records: list[dict]) -> bool:
    """Records over the synthetic shapes, which the compositional scorer can score."""
    from nucleus_image.eval.compositional import validate_records

    try:
        validate_records(records)
    except ValueError:
        return False
    return True


def image_seed(seed: int, index: int, sample: int, samples: int) -> int:
    return seed + index * samples + sample


def _check_settings(out: Path, settings: dict) -> None:
    file = out / "bench.json"
    if file.exists():
        old = json.loads(file.read_text())
        diff = [k for k in GENERATION_KEYS if old.get(k) != settings.get(k)]
        if diff:
            raise ValueError(
                f"{str(out)!r} holds a benchmark run with other settings ({', '.join(diff)}: "
                f"{[old.get(k) for k in diff]} there, {[settings.get(k) for k in diff]} now); use a new "
                f"--out or the same settings to resume"
            )
    out.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(settings, indent=1) + "\n")
    tmp.replace(file)


def generate_benchmark(
    pipeline,
    records: list[dict],
    out: str | Path,
    settings: dict,
    samples: int = 4,
    seed: int = 0,
    steps: int = 50,
    guidance: float = 4.0,
    batch_images: int = 8,
    aspect: str = "1:1",
    progress: bool = True,
) -> dict:
    """Write every missing image of `records` in GenEval's layout; returns {written, skipped_existing, total}."""
    import hashlib

    if samples < 1 or batch_images < 1 or steps < 1:
        raise ValueError(f"samples ({samples}), batch_images ({batch_images}) and steps ({steps}) must be >= 1")
    out = Path(out)
    width, height = pipeline.aspect_size(aspect)
    prompts_blob = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    settings = {
        **settings,
        "prompts_sha256": hashlib.sha256(prompts_blob).hexdigest(),
        "samples": samples,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "width": width,
        "height": height,
        "num_prompts": len(records),
        "seed_rule": "seed + index * samples + sample (CPU generator)",
    }
    _check_settings(out, settings)
    todo = []
    for i, record in enumerate(records):
        folder = out / f"{i:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        meta = folder / "metadata.jsonl"
        if not meta.exists():
            meta.write_text(json.dumps(record) + "\n")
        (folder / "seeds.json").write_text(
            json.dumps({f"{k:04d}.png": image_seed(seed, i, k, samples) for k in range(samples)}) + "\n"
        )
        todo += [(i, k) for k in range(samples) if not (folder / "samples" / f"{k:04d}.png").exists()]
    total = len(records) * samples
    bar = progress_bar(total=total, initial=total - len(todo), desc="geneval images", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_images):
        chunk = todo[start : start + batch_images]
        gens = [torch.Generator("cpu").manual_seed(image_seed(seed, i, k, samples)) for i, k in chunk]
        images = pipeline(
            [records[i]["prompt"] for i, _ in chunk],
            generator=gens,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            progress=False,
        ).images
        for (i, k), image in zip(chunk, images):
            path = out / f"{i:05d}" / "samples" / f"{k:04d}.png"
            tmp = path.with_name(path.name + ".tmp")  # not *.png: no reader mistakes it for a sample
            image.save(tmp, format="PNG")
            tmp.replace(path)
        bar.update(len(chunk))
    bar.close()
    return {"written": len(todo), "skipped_existing": total - len(todo), "total": total}
