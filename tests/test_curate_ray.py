"""The Ray Data engine gives exactly the local engine's manifest and rejects (one local Ray session for the
module, 2 CPUs)."""

from __future__ import annotations

import curate_corpus
import curate_models
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


def test_ray_model_actors_write_the_local_manifest(ray_session, tmp_path):
    """Learned stages on Ray run in actors holding the models (CPU here: the session has no GPU); the manifest,
    rejects and provenance equal the local engine's."""
    clip = curate_models.clip_folder(tmp_path / "clip")
    llava = curate_models.llava_folder(tmp_path / "llava")
    table = curate_models.synth_inputs(tmp_path / "synth")
    cfg = curate_models.model_cfg(clip, llava, ray_model_actors=2)
    on_ray = curate([str(table)], tmp_path / "ray", cfg, engine="ray", progress=False)
    local = curate([str(table)], tmp_path / "local", cfg, engine="local", progress=False)
    assert on_ray.units == local.units == 3 and on_ray.kept == local.kept > 0
    manifest = read_manifest(on_ray.version_dir)
    assert manifest.equals(read_manifest(local.version_dir), check_metadata=True)
    assert read_rejects(on_ray.version_dir).equals(read_rejects(local.version_dir), check_metadata=True)
    assert any(
        s.startswith("vlm:llava@") for sources in manifest.column("caption_sources").to_pylist() for s in sources
    )
