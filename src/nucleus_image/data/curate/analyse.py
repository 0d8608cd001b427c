"""The per-image pass, run by the engines on one work unit (a chunk of the items table) at a time.

Each image is read and decoded once; this pass hashes it (SHA-256, pHash), validates it, measures the
statistics the quality filters need, scores it with the quality scorer, reads and decodes its captions and
scores them with the alignment scorer; a configured captioner then writes captions for the images left without
a usable one. Scorers and the captioner see the whole unit at once, so learned models run batched. This pass
decides only what a single image can decide (input and validation rejections); the stages that need the whole
corpus (duplicates, soft-capped buckets) run in `run.py` over the analysis tables. `analyse_items` is a pure function of a record batch; `process_chunk` adds the I/O around it.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

import imagehash
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from nucleus_image.data.curate import captions as captions_mod
from nucleus_image.data.curate import quality
from nucleus_image.data.curate.config import CurateConfig
from nucleus_image.data.curate.inputs import decode_caption_bytes, parse_caption_doc, read_image_bytes
from nucleus_image.data.curate.validate import Rejected, decode

ANALYSIS_SCHEMA = pa.schema(
    [
        pa.field("item_index", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("image_path", pa.string()),  # what the manifest will point at (extracted copy for tar members)
        pa.field("sha256", pa.string()),
        pa.field("phash", pa.uint64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("file_bytes", pa.int64()),
        pa.field("format", pa.string()),
        pa.field("mode", pa.string()),
        *[pa.field(name, pa.float64()) for name in quality.STAT_NAMES],
        pa.field("quality_score", pa.float64()),
        pa.field("captions", pa.list_(pa.string())),
        pa.field("caption_sources", pa.list_(pa.string())),
        pa.field("caption_scores", pa.list_(pa.float64())),
        pa.field("caption_notes", pa.list_(pa.string())),  # encoding repairs, unreadable caption files
        pa.field("reject_stage", pa.string()),
        pa.field("reject_reason", pa.string()),
        pa.field("reject_detail", pa.string()),
    ]
)


def stage_names(cfg: CurateConfig) -> dict[str, str | None]:
    """The names the manifest records for the quality scorer, the caption scorer and the captioner: a plugin's
    spec, or "<kind>:<model folder name>@<12 hex of its digest>" for a learned model."""
    from_folder = {}
    if cfg.model_folders():
        from nucleus_image.data.curate.model_folders import folder_info

        from_folder = {key: folder_info(folder).label for key, folder in cfg.model_folders().items()}
    return {
        "quality": f"clip-aesthetic:{from_folder['quality.model']}" if cfg.quality.model else cfg.quality.scorer,
        "captions": f"clip-similarity:{from_folder['captions.model']}" if cfg.captions.model else cfg.captions.scorer,
        "captioner": from_folder.get("captioner.model"),
    }


def load_stages(cfg: CurateConfig):
    """(quality scorer, caption scorer, captioner or None), built once per worker process or Ray actor (a learned
    model is expensive to load), and again only when a model folder's content changes."""
    names = stage_names(cfg)
    return _build_stages(cfg, tuple(sorted(names.items(), key=lambda kv: kv[0])))


@lru_cache(maxsize=2)
def _build_stages(cfg: CurateConfig, names_key: tuple):
    names = dict(names_key)
    batch, dtype = cfg.model_batch_size, cfg.model_dtype
    quality_scorer: quality.QualityScorer
    caption_scorer: captions_mod.AlignmentScorer
    if cfg.quality.model or cfg.captions.model:
        from nucleus_image.data.curate import clip_scoring
    if cfg.quality.model:
        quality_scorer = clip_scoring.ClipAestheticScorer(cfg.quality.model, names["quality"], batch, dtype)
    else:
        quality_scorer = quality.load_scorer(cfg.quality.scorer)
    if cfg.captions.model:
        caption_scorer = clip_scoring.ClipAlignmentScorer(
            cfg.captions.model, names["captions"], batch, dtype, cfg.captions.similarity_range
        )
    else:
        caption_scorer = captions_mod.load_scorer(cfg.captions.scorer)
    captioner = None
    if cfg.captioner.model:
        from nucleus_image.data.curate.captioner import VlmCaptioner

        captioner = VlmCaptioner(cfg.captioner.model, names["captioner"], cfg.captioner, batch, dtype)
    return quality_scorer, caption_scorer, captioner


def phash_int(image) -> int:
    """imagehash.phash's 64 bits, row-major, first bit most significant."""
    bits = imagehash.phash(image).hash.ravel()
    return int("".join("1" if b else "0" for b in bits), 2)


def _load_captions(item: dict) -> tuple[list[tuple[str, str]], list[str]]:
    pairs, notes = [], []
    docs = [(Path(f).name, None, f) for f in item["caption_files"]]
    docs += [(name, blob, None) for name, blob in zip(item["caption_blob_names"], item["caption_blobs"])]
    for name, blob, path in docs:
        try:
            data = blob if path is None else Path(path).read_bytes()
        except OSError as err:
            notes.append(f"{name}: unreadable ({err.strerror})")
            continue
        text, note = decode_caption_bytes(data)
        if note:
            notes.append(f"{name}: {note}")
        if text is not None:
            parsed = parse_caption_doc(name, text)
            if not parsed and name.lower().endswith(".json"):
                notes.append(f"{name}: no caption in JSON")
            pairs += parsed
    pairs += list(zip(item["inline_captions"], item["inline_sources"]))
    seen, out = set(), []
    for text, source in pairs:
        text = captions_mod.clean(text)
        if text and text not in seen:
            seen.add(text)
            out.append((text, source))
    return out, notes


def _extract(data: bytes, sha: str, fmt: str, images_dir: Path) -> str:
    """Content-addressed copy of a tar member's image, so the manifest can point at a file."""
    path = images_dir / sha[:2] / f"{sha}.{fmt.lower()}"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
    return str(path.relative_to(images_dir.parent))


def analyse_items(items: pa.Table, cfg: CurateConfig, images_dir: Path) -> pa.Table:
    """One ANALYSIS_SCHEMA row per item, in item order."""
    quality_scorer, caption_scorer, captioner = load_stages(cfg)
    rows: list[dict] = []
    smalls: list[Image.Image | None] = []
    for_captioner: list[Image.Image | None] = []  # the captioner's larger copies (only with a captioner)
    for item in items.to_pylist():
        row = {name: None for name in ANALYSIS_SCHEMA.names}
        row.update(
            item_index=item["item_index"],
            source=item["source"],
            captions=[],
            caption_sources=[],
            caption_scores=[],
            caption_notes=[],
        )
        rows.append(row)
        smalls.append(None)
        for_captioner.append(None)
        try:
            if item["input_reject"]:
                raise Rejected("input", item["input_reject"], item["source"])
            try:
                data = read_image_bytes(item)
            except FileNotFoundError:
                raise Rejected("input", "missing_file", item["path"]) from None
            except OSError as err:
                raise Rejected("input", "unreadable", f"{type(err).__name__}: {err}") from None
            row["file_bytes"] = len(data)
            if not data:
                raise Rejected("input", "zero_byte", "0 bytes")
            row["sha256"] = hashlib.sha256(data).hexdigest()
            rgb, info = decode(data, cfg.validate)
            row.update(width=info["width"], height=info["height"], format=info["format"], mode=info["mode"])
            row["phash"] = phash_int(rgb)
            small = quality.analysis_copy(rgb, cfg.quality.analysis_side)
            if captioner is not None:
                for_captioner[-1] = quality.analysis_copy(rgb, cfg.captioner.image_side)
            del rgb
            stats = quality.image_statistics(small)
            row.update(stats)
            smalls[-1] = small
            row["image_path"] = (
                item["path"] if item["member"] is None else _extract(data, row["sha256"], info["format"], images_dir)
            )
        except Rejected as rej:
            row.update(reject_stage=rej.stage, reject_reason=rej.reason, reject_detail=rej.detail)
        texts, notes = _load_captions(item)
        row["captions"], row["caption_sources"] = [t for t, _ in texts], [s for _, s in texts]
        row["caption_notes"] = notes
    ok = [i for i, s in enumerate(smalls) if s is not None]
    if ok:
        stats = [
            {**{k: rows[i][k] for k in quality.STAT_NAMES}, "source_pixels": rows[i]["width"] * rows[i]["height"]}
            for i in ok
        ]
        scores = quality_scorer.score([smalls[i] for i in ok], stats)
        caption_scores = caption_scorer.score([smalls[i] for i in ok], [rows[i]["captions"] for i in ok])
        for i, score, caps in zip(ok, scores, caption_scores):
            rows[i]["quality_score"] = float(score)
            rows[i]["caption_scores"] = [float(s) for s in caps]
        if captioner is not None:
            _add_generated_captions(rows, ok, smalls, for_captioner, captioner, caption_scorer, cfg)
    return pa.Table.from_pylist(rows, schema=ANALYSIS_SCHEMA)


def _add_generated_captions(rows, ok, smalls, for_captioner, captioner, caption_scorer, cfg: CurateConfig) -> None:
    """Caption the images that need it (all with captioner.when = "always"); the new captions are scored like
    any other and appended after the image's own."""
    floor = cfg.captions.synthesize_below
    todo = [i for i in ok if cfg.captioner.when == "always" or not any(s >= floor for s in rows[i]["caption_scores"])]
    if not todo:
        return
    generated = captioner.caption([for_captioner[i] for i in todo])
    fresh = [[(t, s) for t, s in pairs if t not in rows[i]["captions"]] for i, pairs in zip(todo, generated)]
    scores = caption_scorer.score([smalls[i] for i in todo], [[t for t, _ in pairs] for pairs in fresh])
    for i, pairs, caps in zip(todo, fresh, scores):
        rows[i]["captions"] = rows[i]["captions"] + [t for t, _ in pairs]
        rows[i]["caption_sources"] = rows[i]["caption_sources"] + [s for _, s in pairs]
        rows[i]["caption_scores"] = rows[i]["caption_scores"] + [float(s) for s in caps]
        if not pairs:
            rows[i]["caption_notes"] = rows[i]["caption_notes"] + [f"captioner {captioner.name}: no new caption"]


def chunk_path(work_dir: Path, chunk_id: int) -> Path:
    return Path(work_dir) / "chunks" / f"chunk-{chunk_id:06d}.parquet"


def process_chunk(work_dir: str, chunk_id: int, cfg: CurateConfig, images_dir: str) -> dict:
    """Analyse work unit `chunk_id` (row group `chunk_id` of items.parquet) and write its table atomically; a
    unit whose file exists is complete, which is what makes a killed run resumable."""
    items = pq.ParquetFile(Path(work_dir) / "items.parquet").read_row_group(chunk_id)
    table = analyse_items(items, cfg, Path(images_dir))
    out = chunk_path(Path(work_dir), chunk_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    rejected = int(np.sum(np.asarray(table.column("reject_reason").is_valid())))
    return {"chunk_id": chunk_id, "items": table.num_rows, "rejected": rejected}
