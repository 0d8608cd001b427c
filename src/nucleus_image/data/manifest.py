"""The dataset manifest: one immutable Parquet table per dataset version, read by the trainer and written by
both the curation pipeline and the synthetic-domain generator.

A manifest folder holds `manifest-vNNNN/part-XXXXX.parquet` shards (rows sharded by `partition_key`) plus the
images it points to (paths are relative to the manifest folder's parent, or absolute). Columns:

| column          | type          | meaning                                                                  |
|-----------------|---------------|--------------------------------------------------------------------------|
| image_id        | string        | stable id (hex of the first 16 bytes of sha256 unless the source has one)  |
| image_path      | string        | path to the image file                                                   |
| sha256          | string        | hex SHA-256 of the image file's bytes                                    |
| phash           | uint64        | 64-bit perceptual hash (imagehash.phash bits, row-major)                 |
| width, height   | int32         | pixel size after EXIF orientation                                        |
| quality_score   | float32       | aesthetic / quality score (scale of the scorer recorded in the metadata) |
| tier            | int8          | quality tier 1..5 (A1..A5)                                               |
| bucket          | int8          | episodic curriculum bucket 1..8 (B1..B8)                                 |
| captions        | list<string>  | captions ordered from lowest to highest quality                          |
| caption_sources | list<string>  | one source per caption ("original", "synthetic:template", ...)           |
| partition_key   | int64         | uniform integer in [0, 2**31) for deterministic sharding and sampling   |
| annotations     | string (null) | JSON with domain ground truth (e.g. the synthetic domain's objects)      |

The schema version and free-form provenance live in the Parquet schema metadata.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
NUM_TIERS = 5
NUM_BUCKETS = 8

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_path", pa.string(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("phash", pa.uint64(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("quality_score", pa.float32(), nullable=False),
        pa.field("tier", pa.int8(), nullable=False),
        pa.field("bucket", pa.int8(), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("caption_sources", pa.list_(pa.string()), nullable=False),
        pa.field("partition_key", pa.int64(), nullable=False),
        pa.field("annotations", pa.string(), nullable=True),
    ],
    metadata={b"nucleus_manifest_version": str(SCHEMA_VERSION).encode()},
)


def partition_key_for(sha256_hex: str) -> int:
    """A uniform integer in [0, 2**31) derived from the content hash, so reruns shard identically."""
    return int(hashlib.blake2b(bytes.fromhex(sha256_hex), digest_size=8).hexdigest(), 16) % (2**31)


def validate_table(table: pa.Table) -> None:
    """Raise ValueError naming every problem: missing columns, wrong types, out-of-range tiers/buckets,
    captions and caption_sources of different lengths."""
    problems = []
    for field in SCHEMA:
        if field.name not in table.column_names:
            problems.append(f"missing column {field.name!r} ({field.type})")
        elif not table.schema.field(field.name).type.equals(field.type):
            problems.append(
                f"column {field.name!r} has type {table.schema.field(field.name).type}, expected {field.type}"
            )
    if problems:
        raise ValueError("manifest schema mismatch: " + "; ".join(problems))
    import pyarrow.compute as pc

    for name, hi in (("tier", NUM_TIERS), ("bucket", NUM_BUCKETS)):
        col = table.column(name)
        if len(col) and (pc.min(col).as_py() < 1 or pc.max(col).as_py() > hi):
            problems.append(f"{name} outside 1..{hi}: min {pc.min(col).as_py()}, max {pc.max(col).as_py()}")
    n_caps = pc.list_value_length(table.column("captions"))
    n_srcs = pc.list_value_length(table.column("caption_sources"))
    bad = pc.sum(pc.not_equal(n_caps, n_srcs)).as_py() or 0
    if bad:
        problems.append(f"{bad} rows have len(captions) != len(caption_sources)")
    if problems:
        raise ValueError("invalid manifest: " + "; ".join(problems))


def latest_version_dir(root: str | Path) -> Path:
    """The newest `manifest-vNNNN` folder under root (a dataset folder), or root itself if it holds shards."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {str(root)!r} does not exist")
    versions = sorted(p for p in root.glob("manifest-v*") if p.is_dir())
    if versions:
        return versions[-1]
    if any(root.glob("*.parquet")):
        return root
    raise FileNotFoundError(f"{str(root)!r} holds no manifest (expected manifest-vNNNN/ folders or *.parquet shards)")


def next_version_dir(root: str | Path) -> Path:
    """A new, not yet existing `manifest-vNNNN` folder under root: runs never overwrite an older manifest."""
    root = Path(root)
    existing = [int(p.name.split("-v")[-1]) for p in root.glob("manifest-v*") if p.name.split("-v")[-1].isdigit()]
    return root / f"manifest-v{(max(existing) + 1) if existing else 1:04d}"


def read_manifest(root: str | Path) -> pa.Table:
    """Read and validate the newest manifest version under root."""
    version_dir = latest_version_dir(root)
    shards = sorted(version_dir.glob("*.parquet"))
    table = pa.concat_tables([pq.read_table(p, schema=SCHEMA) for p in shards]) if shards else SCHEMA.empty_table()
    validate_table(table)
    return table


def write_shard(table: pa.Table, path: str | Path, provenance: dict | None = None) -> None:
    """Validate and write one shard atomically (temp file then rename)."""
    table = table.cast(SCHEMA) if not table.schema.equals(SCHEMA, check_metadata=False) else table
    validate_table(table)
    meta = dict(SCHEMA.metadata)
    if provenance:
        meta[b"nucleus_provenance"] = json.dumps(provenance, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


# Every input a curation run does not put in the manifest lands in a rejects table (`manifest-vNNNN/rejects/`)
# with the stage that refused it and a reason code, so nothing is dropped silently and counts add up.
REJECT_REASONS: dict[str, str] = {
    "missing_file": "the listed image file does not exist",
    "unreadable": "the file could not be read (I/O error, bad tar member)",
    "zero_byte": "the file is empty",
    "orphan_caption": "a caption file with no image beside it",
    "no_image": "a WebDataset sample with no image member",
    "not_an_image": "the bytes are not an image format Pillow can identify",
    "truncated": "the image data ends early or is corrupt",
    "decompression_bomb": "the header declares more pixels than the configured limit (refused before decoding)",
    "too_small": "shorter side below the configured minimum",
    "too_large": "longer side above the configured maximum",
    "aspect_ratio": "long/short side ratio above the configured maximum",
    "unsupported_mode": "pixel mode that cannot be normalised to RGB",
    "duplicate_exact": "identical bytes (SHA-256) to the kept image named in duplicate_of",
    "duplicate_near": "perceptual hash within the Hamming radius of the kept image named in duplicate_of",
    "blank": "flat image: luminance standard deviation below the threshold",
    "histogram_anomaly": "nearly all pixels clipped to black or white, or too few grey levels",
    "blurry": "Laplacian variance and high-frequency energy both below their thresholds",
    "low_quality": "quality score below the minimum kept score",
    "no_caption": "no usable caption (missing, undecodable, or all routed to synthesize)",
}
REJECT_STAGES = ("input", "validate", "dedup", "quality", "captions")

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # path, or tar:PATH#MEMBER for WebDataset members
        pa.field("stage", pa.string(), nullable=False),  # one of REJECT_STAGES
        pa.field("reason", pa.string(), nullable=False),  # a key of REJECT_REASONS
        pa.field("detail", pa.string(), nullable=True),  # the offending value, e.g. "size 120x300 < 256"
        pa.field("sha256", pa.string(), nullable=True),
        pa.field("duplicate_of", pa.string(), nullable=True),  # source of the kept image, for duplicates
    ],
    metadata={b"nucleus_manifest_version": str(SCHEMA_VERSION).encode()},
)


def read_rejects(root: str | Path) -> pa.Table:
    """The rejects table of the newest manifest version under root (empty if that version has none)."""
    shards = sorted((latest_version_dir(root) / "rejects").glob("*.parquet"))
    if not shards:
        return REJECTS_SCHEMA.empty_table()
    return pa.concat_tables([pq.read_table(p, schema=REJECTS_SCHEMA) for p in shards])
