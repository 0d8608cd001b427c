"""Inputs: turn the paths a user names into one Arrow table of items, one row per candidate image.

Accepted inputs (each INPUT on the command line is one of):
- a folder, walked recursively in sorted order. Every file that is not hidden and not a caption sidecar is a
  candidate image (decoded by content, so a PNG named `.jpg` or `.dat` is still found). The captions of
  `dir/cat.jpg` are `dir/cat.txt` (the whole text is one caption) and/or `dir/cat.json` (see `parse_caption_doc`);
  a `.txt` / `.json` with no file of the same stem beside it is reported as an `orphan_caption`.
- a single image file (with the same sidecar rule);
- a WebDataset shard `*.tar` (also `.tar.gz` / `.tgz`): members grouped by key (the member path up to the first
  dot of its basename); the sample's image is its member with an image extension, its captions its `.txt` /
  `.caption` / `.json` members. A sample with no image member is reported as `no_image`;
- a Parquet table `*.parquet` with a column `image_path` (or `path`; relative paths resolve against the table's
  folder) and optionally `caption` (string) or `captions` (list of strings) and `caption_sources`.

Nothing is read from the images here: enumeration only stats files and reads tar headers, so it is cheap and
the decode work happens in the engines.
"""

from __future__ import annotations

import json
import os
import tarfile
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif", ".ppm", ".pgm"}
CAPTION_EXTS = {".txt", ".json", ".caption"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")

ITEMS_SCHEMA = pa.schema(
    [
        pa.field("item_index", pa.int64()),
        pa.field("source", pa.string()),  # unique: absolute path, or tar:SHARD#MEMBER
        pa.field("path", pa.string()),  # the image file, or the tar shard holding it
        pa.field("member", pa.string()),  # tar member name (null for files)
        pa.field("offset", pa.int64()),  # byte offset of an uncompressed tar member's data (null otherwise)
        pa.field("length", pa.int64()),  # file or member size in bytes
        pa.field("mtime_ns", pa.int64()),
        pa.field("caption_files", pa.list_(pa.string())),  # sidecar files, read by the workers
        pa.field("caption_blobs", pa.list_(pa.binary())),  # caption members of a tar sample, raw bytes
        pa.field("caption_blob_names", pa.list_(pa.string())),
        pa.field("inline_captions", pa.list_(pa.string())),  # captions given by a Parquet input
        pa.field("inline_sources", pa.list_(pa.string())),
        pa.field("input_reject", pa.string()),  # reason code decided at enumeration (orphan_caption, ...)
    ]
)


def _row(
    source,
    path,
    *,
    member=None,
    offset=None,
    length=0,
    mtime_ns=0,
    caption_files=(),
    blobs=(),
    blob_names=(),
    inline=(),
    inline_sources=(),
    reject=None,
) -> dict:
    return {
        "source": source,
        "path": path,
        "member": member,
        "offset": offset,
        "length": length,
        "mtime_ns": mtime_ns,
        "caption_files": list(caption_files),
        "caption_blobs": list(blobs),
        "caption_blob_names": list(blob_names),
        "inline_captions": list(inline),
        "inline_sources": list(inline_sources),
        "input_reject": reject,
    }


def _file_rows(files: list[Path]) -> list[dict]:
    """Rows for a sorted list of files from one folder walk: images with their sidecars, orphan captions."""
    by_stem: dict[tuple[Path, str], list[Path]] = {}
    for f in files:
        by_stem.setdefault((f.parent, f.stem), []).append(f)
    rows = []
    for f in files:
        group = by_stem[(f.parent, f.stem)]
        sidecars = [g for g in group if g.suffix.lower() in {".txt", ".json"}]
        if f in sidecars:
            if len(sidecars) == len(group):  # no image shares this stem
                st = f.stat()
                rows.append(_row(str(f), str(f), length=st.st_size, mtime_ns=st.st_mtime_ns, reject="orphan_caption"))
            continue
        st = f.stat()
        rows.append(
            _row(str(f), str(f), length=st.st_size, mtime_ns=st.st_mtime_ns, caption_files=[str(s) for s in sidecars])
        )
    return rows


def _folder_rows(root: Path) -> list[dict]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(Path(dirpath) / n for n in filenames if not n.startswith("."))
    return _file_rows(sorted(f.resolve() for f in files))


def _sample_key(member_name: str) -> tuple[str, str]:
    """WebDataset convention: key = path with the basename cut at its first dot; the rest is the extension."""
    head, _, base = member_name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ("." + ext.lower() if dot else "")


def _tar_rows(shard: Path) -> list[dict]:
    st = shard.stat()
    compressed = not shard.name.endswith(".tar")
    samples: dict[str, list[tuple[str, tarfile.TarInfo]]] = {}
    blobs: dict[str, bytes] = {}
    with tarfile.open(shard, "r:*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            key, ext = _sample_key(info.name)
            samples.setdefault(key, []).append((ext, info))
            if ext.rsplit(".", 1)[-1] in {"txt", "json", "caption"}:
                handle = tar.extractfile(info)
                blobs[info.name] = handle.read() if handle else b""
    rows = []
    for key, members in samples.items():
        images = [(e, i) for e, i in members if "." + e.rsplit(".", 1)[-1] in IMAGE_EXTS]
        caps = [i.name for e, i in members if i.name in blobs]
        if not images:
            rows.append(_row(f"tar:{shard}#{key}", str(shard), member=key, mtime_ns=st.st_mtime_ns, reject="no_image"))
        for _, info in images:
            rows.append(
                _row(
                    f"tar:{shard}#{info.name}",
                    str(shard),
                    member=info.name,
                    offset=None if compressed else info.offset_data,
                    length=info.size,
                    mtime_ns=st.st_mtime_ns,
                    blobs=[blobs[c] for c in caps],
                    blob_names=caps,
                )
            )
    return rows


def _table_rows(table_path: Path) -> list[dict]:
    table = pq.read_table(table_path)
    names = table.column_names
    path_col = "image_path" if "image_path" in names else "path" if "path" in names else None
    if path_col is None:
        raise ValueError(f"Parquet input {str(table_path)!r} has no 'image_path' or 'path' column (columns: {names})")
    rows = []
    for rec in table.to_pylist():
        p = Path(rec[path_col] or "")
        p = (p if p.is_absolute() else table_path.parent / p).resolve()
        caps = rec.get("captions") or ([rec["caption"]] if rec.get("caption") else [])
        srcs = rec.get("caption_sources") or []
        srcs = list(srcs) if len(srcs) == len(caps) else ["original"] * len(caps)
        if not p.is_file():
            rows.append(_row(str(p), str(p), inline=caps, inline_sources=srcs, reject="missing_file"))
            continue
        st = p.stat()
        rows.append(_row(str(p), str(p), length=st.st_size, mtime_ns=st.st_mtime_ns, inline=caps, inline_sources=srcs))
    return rows


def enumerate_inputs(inputs: list[str | Path]) -> pa.Table:
    """The items table (ITEMS_SCHEMA) for the inputs, in input order; raises before any work on a bad path."""
    if not inputs:
        raise ValueError("no inputs given: name at least one folder, image, WebDataset .tar or .parquet table")
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"inputs do not exist: {missing}")
    rows: list[dict] = []
    loose: list[Path] = []
    for raw in inputs:
        path = Path(raw).resolve()
        if path.is_dir():
            rows += _folder_rows(path)
        elif path.name.endswith(TAR_SUFFIXES):
            rows += _tar_rows(path)
        elif path.suffix == ".parquet":
            rows += _table_rows(path)
        else:
            loose.append(path)
    if loose:
        sidecar_dirs = {p.parent for p in loose}
        siblings = [f for d in sidecar_dirs for f in d.iterdir() if f.suffix.lower() in {".txt", ".json"}]
        rows += [r for r in _file_rows(sorted(set(loose) | set(siblings))) if r["input_reject"] is None]
    seen, unique = set(), []
    for r in rows:  # the same file named twice (a folder and a table listing it) is one input
        if r["source"] not in seen:
            seen.add(r["source"])
            unique.append(r)
    if not unique:
        raise ValueError(
            f"no images in {[str(p) for p in inputs]}: looked for image files "
            f"({', '.join(sorted(IMAGE_EXTS))}) in folders (recursively), WebDataset shards "
            f"({', '.join(TAR_SUFFIXES)}) and .parquet tables with an 'image_path' or 'path' column"
        )
    for i, r in enumerate(unique):
        r["item_index"] = i
    return pa.Table.from_pylist(unique, schema=ITEMS_SCHEMA)


def read_image_bytes(item: dict) -> bytes:
    """The bytes of an item's image: a file, an uncompressed tar member by offset, or a compressed tar member."""
    if item["member"] is None:
        return Path(item["path"]).read_bytes()
    if item["offset"] is not None:
        with open(item["path"], "rb") as f:
            f.seek(item["offset"])
            data = f.read(item["length"])
        if len(data) != item["length"]:
            raise OSError(f"tar member {item['member']!r} ends early: {len(data)} of {item['length']} bytes")
        return data
    with tarfile.open(item["path"], "r:*") as tar:
        handle = tar.extractfile(item["member"])
        if handle is None:
            raise OSError(f"tar member {item['member']!r} is not a regular file")
        return handle.read()


def decode_caption_bytes(data: bytes) -> tuple[str | None, str | None]:
    """(text, note): UTF-8 (BOM allowed), UTF-16 with a BOM, else Windows-1252 recorded as a repair; None when no
    encoding fits or the text holds control characters (a binary file under a caption name)."""
    note = None
    candidates = ["utf-16"] if data.startswith((b"\xff\xfe", b"\xfe\xff")) else ["utf-8-sig", "cp1252"]
    text = None
    for enc in candidates:
        try:
            text = data.decode(enc)
        except UnicodeDecodeError:
            continue
        note = None if enc in ("utf-8-sig", "utf-16") else f"decoded as {enc}"
        break
    if text is None:
        return None, "undecodable bytes"
    if any(unicodedata.category(c) == "Cc" and c not in "\n\r\t" for c in text):
        return None, "control characters (binary data?)"
    return unicodedata.normalize("NFC", text), note


def parse_caption_doc(name: str, text: str) -> list[tuple[str, str]]:
    """(caption, source) pairs from one caption document. `.txt` / `.caption`: the whole text, source "original".
    `.json`: {"caption": str}, {"captions": [str...], "caption_sources": [str...]},
    {"captions": [{"text": str, "source": str}...]} or a bare list of either; other keys are ignored."""
    if not name.lower().endswith(".json"):
        return [(text, "original")]
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return []
    if isinstance(doc, dict):
        entries = doc.get("captions", [doc["caption"]] if "caption" in doc else [])
        sources = doc.get("caption_sources")
    else:
        entries, sources = doc, None
    if not isinstance(entries, list):
        entries = [entries]
    if not (isinstance(sources, list) and len(sources) == len(entries)):
        sources = [None] * len(entries)
    out = []
    for entry, src in zip(entries, sources):
        if isinstance(entry, dict):
            src = entry.get("source", src)
            entry = entry.get("text", entry.get("caption"))
        if isinstance(entry, str):
            out.append((entry, str(src) if src else "original"))
    return out
