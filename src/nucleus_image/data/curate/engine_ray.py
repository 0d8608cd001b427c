"""The Ray Data engine: work units as a Ray dataset of unit ids, mapped by `process_chunk` on the cluster.

Uses a running Ray session if there is one (tests start one with `ray.init(num_cpus=2)`), else connects to
`cfg.ray_address` (a cluster, e.g. "ray://head:10001" or "auto") or starts Ray locally. Workers read the
images and the work folder by path, so on a cluster both must be on a filesystem every node mounts, and the
nucleus_image package must be importable there (installed, or shipped with a runtime_env).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from nucleus_image.data.curate.analyse import process_chunk
from nucleus_image.data.curate.config import CurateConfig
from nucleus_image.progress import progress as progress_bar


def _map_units(batch: pa.Table, work: str, cfg: CurateConfig, images_dir: str) -> pa.Table:
    done = [process_chunk(work, unit, cfg, images_dir) for unit in batch.column("unit").to_pylist()]
    return pa.Table.from_pylist(done)


def run_units(work: Path, units: list[int], cfg: CurateConfig, images_dir: Path, progress: bool) -> None:
    try:
        import ray
    except ImportError:
        raise ValueError("--engine ray needs Ray Data: pip install 'nucleus-image[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=cfg.ray_address, log_to_driver=False)
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # one bar, ours
        ds = ray.data.from_items([{"unit": u} for u in units], override_num_blocks=len(units))
        ds = ds.map_batches(
            _map_units,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"work": str(work), "cfg": cfg, "images_dir": str(images_dir)},
        )
        bar = progress_bar(total=len(units), desc="curate (ray)", unit="unit", disable=not progress)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            bar.update(batch.num_rows)
        bar.close()
    finally:
        if started_here:
            ray.shutdown()
