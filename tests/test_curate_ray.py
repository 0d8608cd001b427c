"""The Ray Data engine gives exactly the local engine's manifest and rejects (one local Ray session for the
module, 2 CPUs)."""

from __future__ import annotations

import curate_corpus
import pyarrow.parquet as pq
import pytest

from nucleus_image.data.curate import CurateConfig, curate
from nucleus_image.data.manifest import read_manifest, read_rejects

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_and_local_engines_write_identical_manifests(ray_session, tmp_path):
    c = curate_corpus.build(tmp_path / "in")
    cfg = CurateConfig(chunk_size=6, workers=1)
    on_ray = curate(c["inputs"], tmp_path / "ray", cfg, engine="ray", progress=False)
    local = curate(c["inputs"], tmp_path / "local", cfg, engine="local", progress=False)
    assert on_ray.units == local.units == 7 and on_ray.kept == local.kept > 0
    for a, b in (
        (read_manifest(on_ray.version_dir), read_manifest(local.version_dir)),
        (read_rejects(on_ray.version_dir), read_rejects(local.version_dir)),
    ):
        assert a.equals(b, check_metadata=True)
    shards = sorted(p.name for p in on_ray.version_dir.glob("part-*.parquet"))
    for name in shards:  # byte-level: same rows in the same order and the same provenance in every shard
        assert pq.read_table(on_ray.version_dir / name).equals(
            pq.read_table(local.version_dir / name), check_metadata=True
        )
