"""Aspect buckets (one bucket per batch, ratio-preserving sizes) and curriculum sampling weights."""

import numpy as np
import pytest

from nucleus_image.training.buckets import assign_buckets, draw_batch, make_buckets
from nucleus_image.training.config import StageConfig
from nucleus_image.training.curriculum import caption_probabilities, pick_caption, row_weights


def test_buckets_keep_ratio_and_area_on_the_grid():
    for res, g in ((32, 8), (48, 4), (1024, 16)):
        for b in make_buckets(res, ("1:1", "4:3", "3:4", "16:9"), g):
            w, h = (int(x) for x in b.ratio.split(":"))
            assert b.width % g == 0 and b.height % g == 0
            assert abs(np.log(b.width / b.height / (w / h))) < 0.1, b
            assert abs(np.log(b.width * b.height / res**2)) < 0.35, b
    assert [(b.width, b.height) for b in make_buckets(32, ("4:3", "3:4"), 8)] == [(32, 24), (24, 32)]
    with pytest.raises(ValueError, match="W:H"):
        make_buckets(32, ("wide",), 8)


def test_every_batch_comes_from_one_bucket_by_weight():
    buckets = make_buckets(32, ("1:1", "4:3", "3:4"), 4)
    widths, heights = np.array([64, 64, 88, 64, 48, 60]), np.array([64, 62, 64, 88, 64, 80])
    of_row = assign_buckets(widths, heights, buckets)
    assert of_row.tolist() == [0, 0, 1, 2, 2, 2]
    weights = np.array([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    rng = np.random.default_rng(0)
    seen = {0: 0, 1: 0, 2: 0}
    for _ in range(300):
        bucket, rows = draw_batch(rng, of_row, weights, len(buckets), 2)
        assert (of_row[rows] == bucket).all() and len(rows) == 2
        seen[bucket] += 1
    assert seen[1] == 0  # zero weight is never drawn
    assert seen[2] / seen[0] == pytest.approx(1.5, rel=0.25)  # buckets by the weight they hold


def test_stage_weights_shift_sampling_mass():
    tiers, buckets = np.array([1, 1, 5, 5]), np.array([1, 8, 1, 8])
    early = StageConfig("a", 1, 32, 4, tier_weights=(1, 1, 1, 1, 1), bucket_weights=(4, 1, 1, 1, 1, 1, 1, 1))
    late = StageConfig("b", 1, 32, 4, tier_weights=(1, 1, 1, 1, 3))
    assert row_weights(tiers, buckets, early).tolist() == pytest.approx([0.4, 0.1, 0.4, 0.1])
    assert row_weights(tiers, buckets, late).tolist() == pytest.approx([0.125, 0.125, 0.375, 0.375])
    with pytest.raises(ValueError, match="zero weight"):
        row_weights(tiers, buckets, StageConfig("c", 1, 32, 4, tier_weights=(0, 0, 0, 0, 0)))


def test_one_caption_granularity_per_sample():
    assert caption_probabilities((3, 1, 0, 0), 4).tolist() == [0.75, 0.25, 0.0, 0.0]
    assert caption_probabilities((1, 2), 3).tolist() == pytest.approx([0.2, 0.4, 0.4])
    rng = np.random.default_rng(1)
    caps = ["short", "two", "detailed", "paragraph"]
    drawn = [pick_caption(rng, caps, (3, 1, 0, 0), 0.1) for _ in range(4000)]
    share = {c: drawn.count(c) / len(drawn) for c in set(drawn)}
    assert set(share) == {"short", "two", ""}
    assert share[""] == pytest.approx(0.1, abs=0.02) and share["short"] == pytest.approx(0.675, abs=0.03)


def test_unreadable_images_are_skipped_and_counted(tmp_path, capsys):
    import torch
    from training_helpers import micro_config, micro_dataset

    from nucleus_image.data.manifest import read_manifest
    from nucleus_image.training.trainer import Trainer

    data = micro_dataset(tmp_path / "data")
    first = read_manifest(data).column("image_path")[0].as_py()
    (data / first).write_bytes(b"not a png")
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(micro_config(), data, tmp_path / "run", max_steps=4, progress=False)
        assert "skipping 1 unreadable images" in capsys.readouterr().out
        result = trainer.train()
    finally:
        torch.set_num_threads(threads)
    assert len(result.losses) == 4 and all(np.isfinite(result.losses))
    assert trainer.weights[~trainer.rows.readable].sum() == 0


def test_config_overrides_round_trip_and_refusals(tmp_path):
    from nucleus_image.training.config import TrainConfig

    cfg = TrainConfig.preset("tiny").override(
        ["lr=3e-3", "stages.1.steps=7", "model.num_experts=16", "timesteps.uniform_share=0.2", "caption_weights=[1,0]"]
    )
    assert cfg.optimizer.lr == 3e-3 and cfg.stages[1].steps == 7 and cfg.model.num_experts == 16
    assert cfg.timesteps.uniform_share == 0.2 and cfg.caption_weights == (1.0, 0.0)
    cfg.save_json(tmp_path / "c.json")
    assert TrainConfig.from_json(tmp_path / "c.json") == cfg
    assert cfg.stage_at(0)[0] == 0 and cfg.stage_at(cfg.stages[0].steps)[0] == 1
    for bad, message in (
        ("lr=abc", "expected a number"),
        ("nope=1", "no field 'nope'"),
        ("stages.9.steps=1", "out of range"),
        ("merge_weights=ema", "accepted: inverse-sqrt"),
        ("stages.0.capacity_factors=[1,2]", "model has 4 layers"),
        ("lr", "not key=value"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig.preset("tiny").override([bad])


def test_optimizer_section_reads_the_old_flat_layout_and_aliases(tmp_path):
    from training_helpers import legacy_layout

    from nucleus_image.training.config import OptimizerConfig, TrainConfig, changed_fields

    cfg = TrainConfig.preset("tiny").override(
        ["optimizer.kind=adamw", "optimizer.betas=[0.8,0.9]", "optimizer.grad_clip=0.5"]
    )
    old = legacy_layout(cfg.to_dict())
    assert old["optimizer"] == "adamw" and old["adam_betas"] == [0.8, 0.9] and "grad_clip" in old and "lr" in old
    assert TrainConfig.from_dict(old) == cfg
    # The flat names stay aliases of the nested keys in --set.
    aliased = TrainConfig.preset("tiny").override(["optimizer=adamw", "adam_betas=[0.8,0.9]", "grad_clip=0.5"])
    assert aliased == cfg and aliased.optimizer == OptimizerConfig(
        kind="adamw", lr=6e-3, warmup_steps=50, betas=(0.8, 0.9), grad_clip=0.5
    )
    assert changed_fields(cfg.to_dict(), cfg.override(["lr=1e-3"]).to_dict()) == ["optimizer.lr"]
    for bad, message in (
        ("optimizer.kind=sgd", r"optimizer.kind 'sgd'; accepted: muon, adamw"),
        ("optimizer.lrr=1", r"no field 'lrr'; accepted here: betas, eps, grad_clip"),
        ("adam_betas=[0.9]", r"optimizer.betas=\[0.9\]: expected 2 entries"),
        ("grad_clip=0", "grad_clip > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig.preset("tiny").override([bad])
