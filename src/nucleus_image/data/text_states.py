"""Frozen text-encoder states of captions, stored on disk once per (encoder, caption) and shared by every run.

    NUCLEUS_CACHE=/big/disk nucleus data encode-captions data/synth [--text-encoder pipeline:DIR]

Layout: CACHE/text-states/<encoder id>/ holds safetensors shards (one tensor per caption, named by the sha256
of the caption, its valid tokens only, fp32) and `index.jsonl`, one line {"key", "shard"} per caption.
CACHE is $NUCLEUS_CACHE, else $XDG_CACHE_HOME/nucleus, else ~/.cache/nucleus.

- The encoder id is a fingerprint of the encoder's files (small files whole; of large weight files the size,
  the safetensors header and 16 spread-out 64 KiB samples), so it is known without loading the encoder and
  changes when its weights do. A training process whose captions are all stored never loads it for them.
- A caption's stored states are those of encoding it alone. Batches of mixed lengths are not exact (a caption's
  states would depend on its neighbours' padded length: MiniLM differs by ~2e-6), and a cache shared across runs
  sees different neighbours in every run; exact resume and run-to-run equality need the same states. Captions of
  equal token length need no padding, so on the CPU they are encoded together, `ENCODE_BATCH` at a time: the
  states are bitwise those of one at a time (tested), ~2.5-4x faster. Elsewhere (GPU kernels may change with
  the batch size) and for encoders that cannot count tokens, each caption is encoded alone.
- Concurrent runs: a shard is written under a unique temp name and renamed into place before its index lines
  are appended (one write under an exclusive lock), so a reader only ever sees complete shards; two runs that
  encode the same caption store identical states and the first index line wins.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import uuid
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nucleus_image.progress import progress as progress_bar

ENCODE_BATCH = 64  # captions of one token length encoded together (CPU)
SHARD_CAPTIONS = 256  # captions per shard (at least): few files, and an interrupted encoding loses at most a shard
OPEN_SHARDS = 64  # memory-mapped shards kept open (least recently used closed first): bounded file handles
_SMALL_FILE = 4 << 20
_SAMPLES, _SAMPLE_BYTES = 16, 64 << 10


def cache_root() -> Path:
    if os.environ.get("NUCLEUS_CACHE"):
        return Path(os.environ["NUCLEUS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nucleus"


def encoder_files(spec: str) -> list[Path]:
    """The folders whose files define the text encoder a training config names ('minilm' or 'pipeline:DIR')."""
    if spec == "minilm":
        from ..encoders.minilm import bundled_model_path

        return [bundled_model_path()]
    if spec.startswith("pipeline:"):
        root = Path(spec.split(":", 1)[1])
        folders = [root / d for d in ("text_encoder", "processor", "tokenizer") if (root / d).is_dir()]
        if not folders:
            raise ValueError(f"pipeline folder {str(root)!r} has no text_encoder/ folder")
        return folders
    raise ValueError(f"unknown text encoder {spec!r}; accepted: 'minilm' or 'pipeline:DIR'")


def encoder_id(spec: str, max_length: int | None = None) -> str:
    digest = hashlib.sha256(json.dumps({"kind": spec.split(":", 1)[0], "max_length": max_length}).encode())
    for folder in encoder_files(spec):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(folder)).encode() + b"\0")
            digest.update(_file_fingerprint(path))
    return digest.hexdigest()[:24]


def _file_fingerprint(path: Path) -> bytes:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= _SMALL_FILE:
            return hashlib.sha256(f.read()).digest()
        h = hashlib.sha256(str(size).encode())
        h.update(f.read(_SMALL_FILE))  # a safetensors header (names, shapes, offsets) sits at the start
        for i in range(_SAMPLES):
            f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
            h.update(f.read(_SAMPLE_BYTES))
        return h.digest()


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode()).hexdigest()


class TextStateStore:
    """The shards of one encoder: which captions are stored, reading their states, adding new ones."""

    def __init__(self, identity: str, root: Path | None = None):
        self.folder = (root or cache_root()) / "text-states" / identity
        self.folder.mkdir(parents=True, exist_ok=True)
        self.index_file = self.folder / "index.jsonl"
        self._shard_of: dict[str, str] = {}
        self._handles: OrderedDict[str, object] = OrderedDict()
        self._read_from = 0
        self.refresh()

    def __getstate__(self) -> dict:
        # Sent to data-loader workers: the index travels, the open shard handles do not (each process opens its own).
        return dict(self.__dict__, _handles=OrderedDict())

    def refresh(self) -> None:
        """Pick up lines other processes appended since the last read (a torn last line is left for later)."""
        if not self.index_file.exists():
            return
        with open(self.index_file, "rb") as f:
            f.seek(self._read_from)
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        for line in complete.splitlines():
            entry = json.loads(line)
            self._shard_of.setdefault(entry["key"], entry["shard"])
        self._read_from += len(complete)

    def __contains__(self, caption: str) -> bool:
        return caption_key(caption) in self._shard_of

    def missing(self, captions) -> list[str]:
        return sorted({c for c in captions if c not in self})

    def get(self, caption: str) -> torch.Tensor:
        """(L, D) fp32 states of the caption's valid tokens, read from its memory-mapped shard."""
        key = caption_key(caption)
        if key not in self._shard_of:
            raise KeyError(f"caption {caption[:60]!r} has no stored text states in {self.folder}")
        shard = self._shard_of[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.folder / shard, framework="pt")
            if len(self._handles) > OPEN_SHARDS:
                self._handles.popitem(last=False)
        self._handles.move_to_end(shard)
        return self._handles[shard].get_tensor(key)

    def add(self, states: dict[str, torch.Tensor]) -> None:
        name = f"shard-{uuid.uuid4().hex}.safetensors"
        tmp = self.folder / f".tmp-{name}"
        save_file({caption_key(c): s.float().contiguous().cpu() for c, s in states.items()}, tmp)
        os.replace(tmp, self.folder / name)
        lines = "".join(json.dumps({"key": caption_key(c), "shard": name}) + "\n" for c in states).encode()
        with open(self.index_file, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        self.refresh()

    def encode_missing(self, text_encoder, captions, progress: bool = True) -> int:
        """Encode and store the captions not yet stored (exactly as one at a time: see the module docstring);
        returns how many were encoded."""
        todo = self.missing(captions)
        bar = progress_bar(total=len(todo), desc="encoding captions", unit="caption", disable=not progress or not todo)
        chunk = {}
        for group in equal_length_groups(text_encoder, todo):
            with torch.no_grad():
                states, mask = text_encoder.encode_unique(group)
            for i, caption in enumerate(group):
                chunk[caption] = states[i, : int(mask[i].sum())]
            bar.update(len(group))
            if len(chunk) >= SHARD_CAPTIONS:
                self.add(chunk)
                chunk = {}
        if chunk:
            self.add(chunk)
        bar.close()
        return len(todo)


def equal_length_groups(text_encoder, captions: list[str]) -> list[list[str]]:
    """Captions split into groups that encode exactly as one at a time: on the CPU, up to ENCODE_BATCH captions
    of one token length per group (in first-seen order); otherwise one caption per group."""
    if not captions:
        return []
    lengths = text_encoder.token_lengths(captions) if text_encoder.device.type == "cpu" else None
    if lengths is None:
        return [[c] for c in captions]
    by_length: dict[int, list[str]] = {}
    for caption, length in zip(captions, lengths):
        by_length.setdefault(length, []).append(caption)
    return [group[i : i + ENCODE_BATCH] for group in by_length.values() for i in range(0, len(group), ENCODE_BATCH)]


def pad_states(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Captions' (L_i, D) states as one (B, L, D) batch right-padded to a multiple of 8 tokens, as the pipeline
    pads, and its (B, L) mask; the mask is None when no row is padded. Host tensors, no device involved."""
    lengths = [r.shape[0] for r in rows]
    L = -(-max(lengths) // 8) * 8
    out = torch.zeros(len(rows), L, rows[0].shape[1])
    mask = torch.zeros(len(rows), L, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : lengths[i]] = r
        mask[i, : lengths[i]] = True
    return out, (None if all(n == L for n in lengths) else mask)


class CaptionStates:
    """Text states for training batches (`pad_states` of the stored states), on `device`. Reads from the store;
    nothing is held in memory beyond the OS page cache of the shards."""

    def __init__(self, store: TextStateStore, device: torch.device):
        self.store, self.device = store, device

    def batch(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        states, mask = pad_states([self.store.get(c) for c in captions])
        return states.to(self.device), (None if mask is None else mask.to(self.device))
