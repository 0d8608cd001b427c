"""The Ray Data engine: work units as a Ray dataset of unit ids, mapped by `process_chunk` on the cluster.

Uses a running Ray session if there is one (tests start one with `ray.init(num_cpus=2)`), else connects to
`cfg.ray_address` (a cluster, e.g. "ray://head:10001" or "auto") or starts Ray locally. Workers read the
images and the work folder by path, so on a cluster both must be on a filesystem every node mounts, and the
nucleus_image package must be importable there (installed, or shipped with a runtime_env).

With learned models configured (quality.model, captions.model, captioner.model) the units go to a pool of
`ray_model_actors` actors that each load the models once and keep them: on a cluster with GPUs each actor holds
one GPU (default and most: one actor per GPU), without GPUs the actors run on CPU (default: one). Model folders
must be readable on every node.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from nucleus_image.data.curate.analyse import load_stages, process_chunk
from nucleus_image.data.curate.config import CurateConfig
from nucleus_image.progress import progress as progress_bar


def _map_units(batch: pa.Table, work: str, cfg: CurateConfig, images_dir: str) -> pa.Table:
    done = [process_chunk(work, unit, cfg, images_dir) for unit in batch.column("unit").to_pylist()]
    return pa.Table.from_pylist(done)


class _ModelWorker:
    """A Ray Data actor: the models load in the constructor, once, and stay loaded for every unit it maps."""

    def __init__(self, cfg: CurateConfig):
        load_stages(cfg)

    def __call__(self, batch: pa.Table, work: str, cfg: CurateConfig, images_dir: str) -> pa.Table:
        return _map_units(batch, work, cfg, images_dir)


def _actor_pool(ray, cfg: CurateConfig, units: int) -> dict:
    """map_batches arguments for the model actors: how many, and one GPU each where the cluster has GPUs."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = min(cfg.ray_model_actors or max(gpus, 1), gpus or units, units)  # never more actors than GPUs
    return {
        "fn_constructor_kwargs": {"cfg": cfg},
        "compute": ray.data.ActorPoolStrategy(size=actors),
        "num_gpus": 1 if gpus else 0,
    }


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
        pool = _actor_pool(ray, cfg, len(units)) if cfg.model_folders() else {}
        ds = ds.map_batches(
            _ModelWorker if pool else _map_units,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={"work": str(work), "cfg": cfg, "images_dir": str(images_dir)},
            **pool,
        )
        bar = progress_bar(total=len(units), desc="curate (ray)", unit="unit", disable=not progress)
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            bar.update(batch.num_rows)
        bar.close()
    finally:
        if started_here:
            ray.shutdown()
