"""Data curation: turn folders of captioned images, WebDataset tars and Parquet tables into a validated,
deduplicated, tiered and bucketed Parquet manifest (`nucleus_image.data.manifest`), locally or on Ray.

    nucleus data curate photos/ shards/000.tar --out dataset/ [--engine local|ray] [--config curate.toml]
    nucleus data stats dataset/

Modules, in pipeline order: inputs, validate, analyse (the per-image pass), dedup, quality, captions, buckets;
run (orchestration and manifest writing), engine_local / engine_ray, stats, config.
"""

from nucleus_image.data.curate.config import CurateConfig
from nucleus_image.data.curate.run import CurateResult, curate

__all__ = ["CurateConfig", "CurateResult", "curate"]
