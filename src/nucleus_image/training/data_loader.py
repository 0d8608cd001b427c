"""The trainer's data: a deterministic batch plan over the manifest, and each rank's slice of it decoded in
DataLoader worker processes.

    plan = BatchPlan(cfg, read_rows("data/synth"), granularity=4)
    loader = rank_loader(plan, rank=0, world_size=2, start=1200, end=2000, num_workers=1)

- Step k's global batch (stage, aspect bucket, rows, one caption per row) is drawn from a generator seeded with
  (seed, k) alone, so it is a pure function of the seed and the step: the data position of a run is its step,
  resuming needs nothing else, and every rank computes the same plan without talking to the others (all ranks of
  an expert-parallel group see the same bucket and batch size, which the equal-split all-to-all needs).
- Rank r of R takes rows [r*B/R, (r+1)*B/R) of the global batch B (of each micro-batch, with gradient
  accumulation), so R processes together train on exactly the rows one process would, in the same order.
- Images are decoded and fitted to the bucket in worker processes, `prefetch_factor` steps ahead of the training
  thread, and the captions' text states are read from the text-state cache there too and padded per micro-batch,
  so the training thread only copies ready tensors to the device. Nothing is cached, so memory stays bounded by
  the prefetch depth whatever the manifest's size. `num_workers=0` does the same work in the training process and
  yields the same batches. A small dataset can instead be held in memory once decoded (`image_cache_mb`, with
  `data_workers=0`): on a 2-core machine a worker process takes CPU time from the training thread, and the demo's
  4,000 images fitted to a bucket are ~12 MB.
- With `alignment_weight` > 0 each item also carries the per-token shape/colour maps of its images
  (`alignment.token_targets`, from the manifest's annotations), with `binding_weight` > 0 each object's per-token
  coverage (`binding.object_coverage`) and shapes; the maps are cached like the images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data.manifest import latest_version_dir, read_manifest
from ..data.text_states import TextStateStore, pad_states
from .buckets import AspectBucket, assign_buckets, draw_batch, fit_image, make_buckets, readable_image
from .config import TrainConfig
from .curriculum import caption_probabilities, pick_caption, row_weights

# Mixed into the seed so the batch stream is independent of the other streams seeded from cfg.seed.
_STREAM = 0x6461_7461


@dataclass(frozen=True)
class ManifestRows:
    paths: list[Path]
    widths: np.ndarray
    heights: np.ndarray
    tiers: np.ndarray
    buckets: np.ndarray
    captions: list[list[str]]
    readable: np.ndarray
    annotations: list[str | None]


def read_rows(data_dir: Path) -> ManifestRows:
    """The manifest's columns the trainer samples from, with unreadable images found up front (a header check)
    so they are never drawn and sampling stays a function of the seed whatever a run touches first."""
    table = read_manifest(data_dir)
    if table.num_rows == 0:
        raise ValueError(f"the manifest in {str(data_dir)!r} has no rows")
    root = latest_version_dir(data_dir).parent
    paths = [Path(p) if Path(p).is_absolute() else root / p for p in table.column("image_path").to_pylist()]
    captions = table.column("captions").to_pylist()
    empty = [i for i, c in enumerate(captions) if not c]
    if empty:
        raise ValueError(f"{len(empty)} manifest rows have no captions (first: row {empty[0]})")
    readable = np.array([readable_image(p) for p in paths])
    if not readable.all():
        bad = np.flatnonzero(~readable)
        print(f"skipping {len(bad)} unreadable images (first: {paths[bad[0]]})")
        if len(bad) == len(paths):
            raise ValueError(f"no readable image in {str(data_dir)!r}")
    return ManifestRows(
        paths,
        table.column("width").to_numpy(),
        table.column("height").to_numpy(),
        table.column("tier").to_numpy().astype(np.int64),
        table.column("bucket").to_numpy().astype(np.int64),
        captions,
        readable,
        table.column("annotations").to_pylist(),
    )


@dataclass(frozen=True)
class StageData:
    aspect_buckets: list[AspectBucket]
    bucket_of_row: np.ndarray
    weights: np.ndarray


@dataclass(frozen=True)
class PlannedBatch:
    step: int
    stage: int
    bucket: AspectBucket
    rows: np.ndarray
    captions: list[str]


class BatchPlan:
    def __init__(self, cfg: TrainConfig, rows: ManifestRows, granularity: int):
        self.cfg, self.rows, self.granularity = cfg, rows, granularity
        self._stages: dict[int, StageData] = {}

    def stage(self, index: int) -> StageData:
        if index not in self._stages:
            stage = self.cfg.stages[index]
            buckets = make_buckets(stage.resolution, stage.aspect_ratios, self.granularity)
            self._stages[index] = StageData(
                buckets,
                assign_buckets(self.rows.widths, self.rows.heights, buckets),
                row_weights(self.rows.tiers, self.rows.buckets, stage) * self.rows.readable,
            )
        return self._stages[index]

    def batch(self, step: int) -> PlannedBatch:
        """The global batch of `step`."""
        index, stage = self.cfg.stage_at(step)
        data = self.stage(index)
        rng = np.random.default_rng([self.cfg.seed, _STREAM, step])
        bucket, rows = draw_batch(rng, data.bucket_of_row, data.weights, len(data.aspect_buckets), stage.batch_size)
        captions = [
            pick_caption(rng, self.rows.captions[r], self.cfg.caption_weights, self.cfg.caption_dropout) for r in rows
        ]
        return PlannedBatch(step, index, data.aspect_buckets[bucket], rows, captions)

    def drawable_captions(self) -> set[str]:
        return drawable_captions(self.rows, self.cfg.caption_weights)


def drawable_captions(rows: ManifestRows, caption_weights: tuple[float, ...]) -> set[str]:
    """Every caption a batch can carry: those with a positive granularity weight, and the empty prompt."""
    out = {""}
    for caps in rows.captions:
        out.update(c for c, w in zip(caps, caption_probabilities(caption_weights, len(caps))) if w > 0)
    return out


def rank_rows(batch_size: int, rank: int, world_size: int, accum: int = 1) -> np.ndarray:
    """The rows of a global batch rank `rank` trains on: its contiguous share of each of the `accum` micro-batches
    (so micro-batch m of every rank together is micro-batch m of one process)."""
    if batch_size % (world_size * accum):
        raise ValueError(
            f"batch_size {batch_size} does not divide over {world_size} processes x {accum} "
            f"accumulation steps; use a multiple of {world_size * accum}"
        )
    micro = batch_size // accum
    per = micro // world_size
    return np.concatenate([np.arange(m * micro + rank * per, m * micro + (rank + 1) * per) for m in range(accum)])


class RankBatches(Dataset):
    """Item k: rank `rank`'s slice of step k's batch, decoded: {"step", "images" uint8 (b, 3, H, W), "captions",
    "texts"}, where "texts" holds one (states, mask) per micro-batch (`text_states.pad_states`) read from `store`
    (absent without a store); plus "targets" (b, tokens, classes) when the config trains an alignment head, and
    "coverage" (b, tokens, objects) with "shapes" (each row's objects' shapes) when it trains the binding loss.
    With `cache_mb` > 0 fitted images (and their maps) are kept per (row, bucket) until that many megabytes are
    held."""

    def __init__(
        self,
        plan: BatchPlan,
        rank: int,
        world_size: int,
        accum: int = 1,
        store: TextStateStore | None = None,
        cache_mb: float = 0.0,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.plan, self.rank, self.world_size, self.accum, self.store = plan, rank, world_size, accum, store
        self.cache_bytes, self.cached_bytes = cache_mb * 2**20, 0
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.align = plan.cfg.alignment_weight > 0
        self.bind = plan.cfg.binding_weight > 0
        if self.align or self.bind:
            from .alignment import check_annotations

            check_annotations(plan.rows.annotations, "alignment_weight" if self.align else "binding_weight")

    def __len__(self) -> int:
        return self.plan.cfg.total_steps

    def _row(self, row: int, width: int, height: int) -> dict[str, torch.Tensor]:
        key = (row, width, height)
        if key in self._cache:
            return self._cache[key]
        rows = self.plan.rows
        out = {"image": fit_image(rows.paths[row], width, height)}
        source = (int(rows.widths[row]), int(rows.heights[row]))
        if self.align:
            from .alignment import token_targets

            out["targets"] = torch.from_numpy(
                token_targets(rows.annotations[row], source, width, height, self.plan.granularity)
            )
        if self.bind:
            from .binding import object_coverage

            out["coverage"] = torch.from_numpy(
                object_coverage(rows.annotations[row], source, width, height, self.plan.granularity)
            )
        size = sum(t.numel() * t.element_size() for t in out.values())
        if self.cached_bytes + size <= self.cache_bytes:
            self._cache[key] = out
            self.cached_bytes += size
        return out

    def __getitem__(self, step: int) -> dict:
        batch = self.plan.batch(step)
        part = rank_rows(len(batch.rows), self.rank, self.world_size, self.accum)
        items = [self._row(int(r), batch.bucket.width, batch.bucket.height) for r in batch.rows[part]]
        captions = [batch.captions[i] for i in part]
        out = {"step": step, "images": torch.stack([it["image"] for it in items]), "captions": captions}
        if self.store is not None:
            per = len(captions) // self.accum
            out["texts"] = [
                pad_states([self.store.get(c) for c in captions[m * per : (m + 1) * per]]) for m in range(self.accum)
            ]
        for name in ("targets", "coverage"):
            if name in items[0]:
                out[name] = torch.stack([it[name] for it in items])
        if self.bind:
            out["shapes"] = [
                [o["shape"] for o in json.loads(self.plan.rows.annotations[int(r)])["objects"]]
                for r in batch.rows[part]
            ]
        return out


def rank_loader(
    plan: BatchPlan,
    rank: int,
    world_size: int,
    start: int,
    end: int,
    num_workers: int,
    accum: int = 1,
    prefetch_factor: int = 2,
    store: TextStateStore | None = None,
    pin_memory: bool = False,
    dataset: RankBatches | None = None,
) -> DataLoader:
    """Steps start..end-1 of this rank, in order, prepared by `num_workers` processes (0 = in this one);
    `pin_memory` for a copy to the GPU that does not wait for the host. Pass `dataset` to reuse one whose
    in-memory cache is already filled (the time guard restarts the loader); `store` is then the dataset's."""
    if num_workers < 0:
        raise ValueError(f"data_workers must be >= 0, got {num_workers}")
    dataset = dataset if dataset is not None else RankBatches(plan, rank, world_size, accum, store)
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start, end),
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers else None,
        worker_init_fn=_one_thread if num_workers else None,
        pin_memory=pin_memory,
        # DataLoader draws its workers' base seed from this generator, else from torch's global RNG,
        # which a resumed run (one more loader started) would then leave in a different state.
        generator=torch.Generator().manual_seed(start),
    )


def _one_thread(_worker_id: int) -> None:
    # Decoding is PIL work; torch threads in workers would only compete with the training thread's matmuls.
    torch.set_num_threads(1)
