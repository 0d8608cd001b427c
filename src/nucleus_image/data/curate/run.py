"""Orchestration of a curation run: enumerate, analyse (on an engine), decide, write a new manifest version.

    from nucleus_image.data.curate import curate, CurateConfig
    result = curate(["photos/", "shard-000.tar"], "dataset/", CurateConfig.preset("recipe"), engine="local")

Layout of DIR after a run:
    manifest-vNNNN/part-XXXXX.parquet   the manifest (SCHEMA), sharded by partition_key range
    manifest-vNNNN/rejects/part-00000.parquet   every input not in the manifest (REJECTS_SCHEMA)
    manifest-vNNNN/curate_config.json, stats.json, run.json
    images/ab/<sha256>.<ext>            images extracted from WebDataset tars (content-addressed)
    .curate-work/<fingerprint>/         work in progress; removed once the version is complete

Resume: the work folder is named by a fingerprint of the inputs (paths, sizes, mtimes) and the config, and
holds one analysis file per completed work unit, written atomically. Running the same command again after a
kill skips the completed units. The manifest version appears by one directory rename at the very end, so a
reader never sees a half-written version and older versions are never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nucleus_image.data.curate import buckets, captions, dedup, quality, stats
from nucleus_image.data.curate.analyse import ANALYSIS_SCHEMA, chunk_path, stage_names
from nucleus_image.data.curate.config import CurateConfig
from nucleus_image.data.curate.inputs import enumerate_inputs
from nucleus_image.data.manifest import (
    REJECTS_SCHEMA,
    SCHEMA,
    SCHEMA_VERSION,
    next_version_dir,
    partition_key_for,
    validate_table,
)

ENGINES = ("local", "ray")
# How a run executes, not what it produces.
_EXECUTION_FIELDS = ("workers", "ray_address", "ray_model_actors", "chunk_size")
_FLUSH_ROWS = 8192
_WIDE_COLUMNS = ("image_path", "format", "mode", "captions", "caption_sources")


@dataclass(frozen=True)
class CurateResult:
    version_dir: Path
    inputs: int
    kept: int
    rejected: int
    units: int
    units_resumed: int  # work units already complete from an earlier, interrupted run


def _fingerprint(items: pa.Table, cfg: CurateConfig, models: dict[str, dict]) -> str:
    h = hashlib.blake2b(digest_size=12)
    digests = {key: m["sha256"] for key, m in models.items()}  # a model folder changed in place is a new run
    h.update(json.dumps([SCHEMA_VERSION, cfg.to_dict(), digests], sort_keys=True).encode())
    for name in ("source", "length", "mtime_ns"):
        h.update(json.dumps(items.column(name).to_pylist()).encode())
    return h.hexdigest()


def _run_engine(engine: str, work: Path, todo: list[int], cfg: CurateConfig, images_dir: Path, progress: bool):
    if engine == "local":
        from nucleus_image.data.curate.engine_local import run_units
    else:
        from nucleus_image.data.curate.engine_ray import run_units
    run_units(work, todo, cfg, images_dir, progress)


def decide(a: pa.Table, cfg: CurateConfig, names: dict[str, str | None]) -> dict[str, np.ndarray | list]:
    """The corpus-level stages over the analysis table (rows in item order), in the issue's order:
    input/validate (already decided per image), exact + near duplicates, blank / histogram / blur, quality
    score, captions, then buckets over what is kept. Returns per-row stage, reason, detail, duplicate_of,
    tier, bucket and partition_key (the last three meaningful for kept rows)."""
    n = a.num_rows
    col = {
        name: a.column(name).to_pylist()
        for name in (
            "source",
            "sha256",
            "reject_stage",
            "reject_reason",
            "reject_detail",
            "caption_scores",
            "caption_notes",
        )
    }
    stage, reason, detail = list(col["reject_stage"]), list(col["reject_reason"]), list(col["reject_detail"])
    dup_of: list[str | None] = [None] * n

    alive = np.array([r is None for r in reason])
    rows = np.nonzero(alive)[0]
    width = np.asarray(a.column("width").fill_null(0), np.int64)
    height = np.asarray(a.column("height").fill_null(0), np.int64)
    reasons, survivor = dedup.deduplicate(
        [col["sha256"][i] for i in rows],
        np.asarray(a.column("phash").fill_null(0), np.uint64)[rows],
        (width * height)[rows],
        np.asarray(a.column("file_bytes").fill_null(0), np.int64)[rows],
        rows,
        cfg.dedup.hamming_below,
    )
    for k, (row, why) in enumerate(zip(rows, reasons)):
        if why:
            keep = rows[survivor[k]]
            stage[row], reason[row], dup_of[row] = "dedup", why, col["source"][keep]
            detail[row] = f"duplicate of {col['source'][keep]}"

    stat_cols = {name: a.column(name).to_pylist() for name in quality.STAT_NAMES}
    score = np.asarray(a.column("quality_score").fill_null(float("nan")), np.float64)
    for row in range(n):
        if reason[row] is not None:
            continue
        failed = quality.filter_reason({k: stat_cols[k][row] for k in quality.STAT_NAMES}, cfg.quality)
        if failed is None and score[row] < cfg.quality.min_score:
            failed = ("low_quality", f"score {score[row]:.3f} < {cfg.quality.min_score} ({names['quality']})")
        if failed is None and not any(s >= cfg.captions.synthesize_below for s in col["caption_scores"][row]):
            got = len(col["caption_scores"][row])
            notes = "; ".join(col["caption_notes"][row])
            failed = (
                "no_caption",
                (f"no usable caption ({notes})" if notes else "no caption found")
                if not got
                else f"all {got} captions score < {cfg.captions.synthesize_below} ({names['captions']})",
            )
        if failed is not None:
            stage[row] = "captions" if failed[0] == "no_caption" else "quality"
            reason[row], detail[row] = failed

    kept = np.array([r is None for r in reason], bool)
    tier = np.zeros(n, np.int8)
    tier[kept] = quality.tiers(score[kept], cfg.quality)
    pkey = np.array([partition_key_for(s) if s else -1 for s in col["sha256"]], np.int64)
    bucket = np.zeros(n, np.int8)
    bucket[kept] = buckets.assign(pkey[kept], tier[kept], width[kept], height[kept], cfg.buckets)
    return {
        "stage": stage,
        "reason": reason,
        "detail": detail,
        "duplicate_of": dup_of,
        "kept": kept,
        "tier": tier,
        "bucket": bucket,
        "partition_key": pkey,
    }


class _ShardWriters:
    """Streaming Parquet writers, one per partition_key range, buffering rows to sizeable row groups."""

    def __init__(self, folder: Path, num_shards: int, schema: pa.Schema):
        self.schema, self.num_shards = schema, num_shards
        self.writers = [pq.ParquetWriter(folder / f"part-{s:05d}.parquet", schema) for s in range(num_shards)]
        self.buffers: list[list[dict]] = [[] for _ in range(num_shards)]

    def add(self, row: dict, shard: int = 0):
        self.buffers[shard].append(row)
        if len(self.buffers[shard]) >= _FLUSH_ROWS:
            self.flush(shard)

    def flush(self, shard: int):
        if self.buffers[shard]:
            table = pa.Table.from_pylist(self.buffers[shard], schema=self.schema)
            if self.schema.names == SCHEMA.names:
                validate_table(table)
            self.writers[shard].write_table(table)
            self.buffers[shard] = []

    def close(self):
        for s in range(self.num_shards):
            self.flush(s)
            self.writers[s].close()


def _annotations(r: dict, records: list[dict], names: dict[str, str | None]) -> str:
    curation = {
        "source": r["source"],
        "format": r["format"],
        "mode": r["mode"],
        "stats": {k: round(r[k], 4) for k in quality.STAT_NAMES},
        "quality_scorer": names["quality"],
        "caption_scorer": names["captions"],
        "captions": records,
        "caption_notes": r["caption_notes"],
    }
    if names["captioner"]:
        curation["captioner"] = names["captioner"]
    return json.dumps({"curation": curation}, sort_keys=True, ensure_ascii=False)


def _write_version(
    work: Path, n_units: int, d: dict, cfg: CurateConfig, inputs: list[str], models: dict[str, dict]
) -> Path:
    """Stream the analysis tables into the staged manifest and rejects tables; returns the staged folder."""
    staged = work / "manifest"
    if staged.exists():  # a kill during an earlier finalisation: redo it, it is cheap next to the analysis
        shutil.rmtree(staged)
    (staged / "rejects").mkdir(parents=True)
    provenance = {
        "tool": "nucleus data curate",
        "inputs": inputs,
        "config": {k: v for k, v in cfg.to_dict().items() if k not in _EXECUTION_FIELDS},
    }
    if models:
        provenance["models"] = models  # by config key: path, name, sha256, model_type, transformers_version
    names = stage_names(cfg)
    meta = {**SCHEMA.metadata, b"nucleus_provenance": json.dumps(provenance, sort_keys=True).encode()}
    manifest = _ShardWriters(staged, cfg.num_shards, SCHEMA.with_metadata(meta))
    rejects = _ShardWriters(staged / "rejects", 1, REJECTS_SCHEMA)
    for unit in range(n_units):
        for r in pq.read_table(chunk_path(work, unit)).to_pylist():
            i = r["item_index"]
            if not d["kept"][i]:
                rejects.add(
                    {
                        "source": r["source"],
                        "stage": d["stage"][i],
                        "reason": d["reason"][i],
                        "detail": d["detail"][i],
                        "sha256": r["sha256"],
                        "duplicate_of": d["duplicate_of"][i],
                    }
                )
                continue
            texts, sources, records = captions.curate_captions(
                r["captions"], r["caption_sources"], r["caption_scores"], cfg.captions
            )
            key = int(d["partition_key"][i])
            manifest.add(
                {
                    "image_id": r["sha256"][:32],
                    "image_path": r["image_path"],
                    "sha256": r["sha256"],
                    "phash": r["phash"],
                    "width": r["width"],
                    "height": r["height"],
                    "quality_score": r["quality_score"],
                    "tier": int(d["tier"][i]),
                    "bucket": int(d["bucket"][i]),
                    "captions": texts,
                    "caption_sources": sources,
                    "partition_key": key,
                    "annotations": _annotations(r, records, names),
                },
                shard=key * cfg.num_shards >> 31,
            )
    manifest.close()
    rejects.close()
    (staged / "curate_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    return staged


def _with_absolute_model_paths(cfg: CurateConfig) -> CurateConfig:
    def absolute(folder: str | None) -> str | None:
        return None if folder is None else str(Path(folder).resolve())

    return dataclasses.replace(
        cfg,
        quality=dataclasses.replace(cfg.quality, model=absolute(cfg.quality.model)),
        captions=dataclasses.replace(cfg.captions, model=absolute(cfg.captions.model)),
        captioner=dataclasses.replace(cfg.captioner, model=absolute(cfg.captioner.model)),
    )


def curate(
    inputs: list[str | Path],
    out: str | Path,
    cfg: CurateConfig | None = None,
    engine: str = "local",
    progress: bool = True,
) -> CurateResult:
    """Curate `inputs` into a new manifest version under `out`; resumes an interrupted identical run."""
    cfg = cfg or CurateConfig()
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; accepted: {list(ENGINES)}")
    out = Path(out).resolve()
    for raw in inputs:
        src = Path(raw).resolve()
        if src.is_dir() and (out == src or src in out.parents):
            raise ValueError(
                f"output folder {str(out)!r} is inside input folder {str(src)!r}: inputs are never "
                "modified, so choose an output outside the inputs"
            )
    models = {}
    if cfg.model_folders():  # every model folder is checked before any input is looked at
        from nucleus_image.data.curate.model_folders import check_all

        models = {key: info.provenance() for key, info in check_all(cfg.model_folders()).items()}
        cfg = _with_absolute_model_paths(cfg)  # workers (Ray's included) may run in another folder
    started = time.perf_counter()
    items = enumerate_inputs(inputs)
    work = out / ".curate-work" / _fingerprint(items, cfg, models)
    items_path = work / "items.parquet"
    if not items_path.exists():
        work.mkdir(parents=True, exist_ok=True)
        pq.write_table(items, items_path.with_suffix(".tmp"), row_group_size=cfg.chunk_size)
        items_path.with_suffix(".tmp").replace(items_path)
    n_units = math.ceil(items.num_rows / cfg.chunk_size)
    todo = [u for u in range(n_units) if not chunk_path(work, u).exists()]
    if todo:
        _run_engine(engine, work, todo, cfg, out / "images", progress)

    # Only the narrow columns the corpus-level stages need are held in memory; captions stream later.
    narrow = [n for n in ANALYSIS_SCHEMA.names if n not in _WIDE_COLUMNS]
    analysis = pa.concat_tables(
        [pq.read_table(chunk_path(work, u), columns=narrow) for u in range(n_units)]
        or [ANALYSIS_SCHEMA.empty_table().select(narrow)]
    )
    decisions = decide(analysis, cfg, stage_names(cfg))
    staged = _write_version(work, n_units, decisions, cfg, [str(Path(p).resolve()) for p in inputs], models)
    counts = stats.collect_from(staged)
    (staged / "stats.json").write_text(json.dumps(counts, indent=2, sort_keys=True) + "\n")
    (staged / "run.json").write_text(
        json.dumps(
            {
                "engine": engine,
                "units": n_units,
                "units_resumed": n_units - len(todo),
                "seconds": round(time.perf_counter() - started, 3),
            },
            indent=2,
        )
        + "\n"
    )
    version_dir = next_version_dir(out)
    staged.rename(version_dir)
    shutil.rmtree(work)
    if not any((out / ".curate-work").iterdir()):
        (out / ".curate-work").rmdir()
    return CurateResult(version_dir, items.num_rows, counts["kept"], counts["rejected"], n_units, n_units - len(todo))
