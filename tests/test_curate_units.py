"""Unit tests of the curation stages: near-duplicate index against brute force, survivor rule, bucket rule,
caption routing and variants, caption decoding, tiers, blur measures, mode normalisation, config files."""

from __future__ import annotations

import json

import numpy as np
import pytest
from curate_corpus import encode, scene
from PIL import Image, ImageFilter

from nucleus_image.data.curate import buckets, captions, dedup, quality
from nucleus_image.data.curate.config import BucketConfig, CaptionConfig, CurateConfig, QualityConfig, ValidateConfig
from nucleus_image.data.curate.inputs import decode_caption_bytes, parse_caption_doc
from nucleus_image.data.curate.validate import Rejected, decode


def _planted(n: int, seed: int = 0) -> tuple[np.ndarray, dict[int, int]]:
    """n random hashes, the last ones copies of earlier ones with 0..7 bits flipped; {copy: distance}."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(
        np.uint64
    )
    dist = {}
    for k, row in enumerate(range(n - 64, n)):
        d = k % 8
        flip = sum(1 << int(b) for b in rng.choice(64, d, replace=False))
        h[row] = h[k] ^ np.uint64(flip)
        dist[row] = d
    return h, dist


@pytest.mark.parametrize("bands", [None, 3, 4, 5])
def test_near_pairs_equal_brute_force(bands):
    h, dist = _planted(3000)
    fast = dedup.near_pairs(h, 4, bands=bands)
    slow = dedup.all_pairs_near(h, 4)
    assert np.array_equal(fast, slow)
    found = {tuple(p) for p in fast.tolist()}
    for row, d in dist.items():
        assert ((row - 2936, row) in found) == (d <= 4), (row, d)


def test_choose_bands_and_refuses_huge_tables():
    assert dedup.choose_bands(50, 4) == 5  # exact match on 13-bit bands: no probing
    assert dedup.choose_bands(1_000_000, 4) == 3  # 21/22-bit bands, radius 1
    with pytest.raises(ValueError, match="bands=2"):
        dedup.near_pairs(np.arange(10, dtype=np.uint64), 4, bands=2)


def test_survivor_rule_and_chains():
    # rows: 0 and 1 identical bytes; 2 a near duplicate of 0 with more pixels; 3 unrelated; 4 copy of 0.
    sha = ["a", "a", "b", "c", "a"]
    ph = np.array([0b0, 0b0, 0b111, 2**64 - 1, 0b0], np.uint64)
    pixels = np.array([100, 100, 200, 100, 100])
    nbytes = np.array([10, 10, 10, 10, 10])
    reasons, survivor = dedup.deduplicate(sha, ph, pixels, nbytes, np.arange(5), 5)
    assert reasons == ["duplicate_near", "duplicate_near", None, None, "duplicate_near"]
    assert survivor.tolist() == [2, 2, 2, 3, 2]
    # Equal pixels: the larger file survives; then input order.
    reasons, survivor = dedup.deduplicate(
        ["x", "y", "z"], np.array([1, 1, 1], np.uint64), np.array([9, 9, 9]), np.array([5, 7, 7]), np.arange(3), 5
    )
    assert reasons == ["duplicate_near", None, "duplicate_near"] and survivor.tolist() == [1, 1, 1]
    reasons, _ = dedup.deduplicate(
        ["x", "x"], np.array([0, 0], np.uint64), np.array([9, 9]), np.array([5, 5]), np.arange(2), 5
    )
    assert reasons == [None, "duplicate_exact"]


def test_bucket_probabilities_follow_the_published_rule():
    cfg = BucketConfig()
    tier, w, h = np.array([1, 3, 5]), np.array([300, 800, 2000]), np.array([300, 800, 2000])
    p = buckets.probabilities(tier, w, h, cfg)
    s = buckets.size_rank(w, h, cfg.size_edges)
    z = 0.6 * (tier - 1) / 4 + 0.4 * s
    mu = np.linspace(-1.75, 1.75, 8)
    ref = np.exp(-((z[:, None] - mu) ** 2) / 2 / 0.7)
    np.testing.assert_allclose(p, ref / ref.sum(1, keepdims=True), rtol=1e-12)
    assert s.tolist() == [0.0, 0.6, 1.0]
    assert np.argmax(p[2]) > np.argmax(p[0])  # better, larger images lean to later buckets


def test_buckets_deterministic_by_key_and_soft_capped():
    rng = np.random.default_rng(1)
    n = 20000
    keys = rng.integers(0, 2**31, n)
    tier, side = np.full(n, 5), np.full(n, 2048)
    free = BucketConfig(soft_cap=1.0)
    b = buckets.assign(keys, tier, side, side, free)
    perm = rng.permutation(n)
    assert np.array_equal(buckets.assign(keys[perm], tier[perm], side[perm], side[perm], free), b[perm])
    freq = np.bincount(b - 1, minlength=8) / n
    np.testing.assert_allclose(freq, buckets.probabilities(tier[:1], side[:1], side[:1], free)[0], atol=0.015)
    assert freq.max() > 0.25
    capped = buckets.assign(keys, tier, side, side, BucketConfig(soft_cap=0.2))
    counts = np.bincount(capped - 1, minlength=8)
    assert counts.max() <= int(np.ceil(0.2 * n)) and counts.sum() == n
    cap = int(np.ceil(0.2 * n))
    assert (np.bincount(b - 1, minlength=8) > cap).any()
    open_buckets = np.nonzero(counts < cap)[0] + 1  # never filled: none of their members moved
    assert (capped == b)[np.isin(b, open_buckets)].all() and (capped != b).sum() > 0
    assert set(np.unique(capped).tolist()) <= set(range(1, 9))


def test_caption_routing_order_and_variants():
    cfg = CaptionConfig()
    assert [captions.route(s, cfg) for s in (0.66, 0.65, 0.30, 0.29)] == ["keep", "refine", "refine", "synthesize"]
    texts = ["IMG_0042.jpg", "a kite", "A green kite with a long tail flies over a crowded summer beach."]
    scorer = captions.CaptionTextHeuristicScorer()
    [scores] = scorer.score([None], [texts])
    assert scores[0] < 0.3 < scores[1] < 0.65 < scores[2]
    kept, sources, records = captions.curate_captions(texts, ["alt", "user", "vlm"], scores, cfg)
    assert kept == texts[1:] and sources == ["user", "vlm"]
    assert [r["route"] for r in records] == ["synthesize", "refine", "keep"]
    para = "One cat sits. It is grey. The sofa is red. A lamp glows. Rain falls outside. The clock says nine."
    kept, sources, records = captions.curate_captions([para], ["original"], [0.9], cfg)
    assert kept == [
        "One cat sits.",
        "One cat sits. It is grey.",
        "One cat sits. It is grey. The sofa is red. A lamp glows. Rain falls outside.",
        para,
    ]
    assert [captions.granularity(k) for k in kept] == list(captions.GRANULARITIES)
    assert sources[-1] == "original" and sources[0] == "derived:1-sentence:from:original"
    assert len(records) == 4
    kept, _, _ = captions.curate_captions(["Short one.", para], ["a", "b"], [0.7, 0.9], cfg)
    assert kept == ["Short one.", para]  # a short caption exists: nothing derived


def test_caption_decoding_and_json_forms():
    assert decode_caption_bytes("naïve café".encode()) == ("naïve café", None)
    assert decode_caption_bytes("naïve".encode("utf-16")) == ("naïve", None)
    assert decode_caption_bytes("café".encode("cp1252")) == ("café", "decoded as cp1252")
    assert decode_caption_bytes(b"\x81\x8d\xff")[0] is None
    assert decode_caption_bytes(b"abc\x00def")[0] is None
    assert parse_caption_doc("a.json", json.dumps({"captions": ["x", "y"], "caption_sources": ["s1", "s2"]})) == [
        ("x", "s1"),
        ("y", "s2"),
    ]
    assert parse_caption_doc("a.json", '[{"text": "x", "source": "v"}, "y"]') == [("x", "v"), ("y", "original")]
    assert parse_caption_doc("a.json", "{not json") == []
    assert parse_caption_doc("a.txt", "{not json") == [("{not json", "original")]


def test_tiers_edges_and_blur_measures():
    scores = np.array([5.0, 5.49, 5.5, 6.0, 6.5, 6.79, 6.8, 9.0])
    assert quality.tiers(scores, QualityConfig()).tolist() == [1, 1, 2, 3, 4, 4, 5, 5]
    sharp = quality.image_statistics(scene(3))
    soft = quality.image_statistics(scene(3).filter(ImageFilter.GaussianBlur(6)))
    assert soft["laplacian_var"] < sharp["laplacian_var"] / 20
    assert soft["highfreq_ratio"] < sharp["highfreq_ratio"] / 5
    assert quality.filter_reason(sharp, QualityConfig()) is None
    assert quality.filter_reason(soft, QualityConfig())[0] == "blurry"


def test_decode_normalises_modes_and_orientation():
    cfg = ValidateConfig()
    base = scene(7)
    grey16 = Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 100)
    for img, fmt in (
        (base.convert("CMYK"), "JPEG"),
        (base.convert("P"), "PNG"),
        (grey16, "PNG"),
        (base.convert("LA"), "PNG"),
        (base.convert("1"), "PNG"),
    ):
        rgb, info = decode(encode(img, fmt), cfg)
        assert rgb.mode == "RGB" and rgb.size == base.size, info
    rgb, _ = decode(encode(grey16, "PNG"), cfg)
    lum = np.asarray(rgb.convert("L"))
    assert lum.min() == 0 and lum.max() == 255  # 16-bit range rescaled, not clipped
    rgba = Image.new("RGBA", (300, 300), (255, 0, 0, 0))
    assert decode(encode(rgba, "PNG"), cfg)[0].getpixel((5, 5)) == (255, 255, 255)  # transparent -> white
    exif = Image.Exif()
    exif[0x0112] = 8
    assert decode(encode(scene(8, (320, 280)), "JPEG", exif=exif), cfg)[1]["width"] == 280
    with pytest.raises(Rejected) as err:
        decode(encode(scene(9, (300, 1300)), "PNG"), cfg)
    assert err.value.reason == "aspect_ratio" and "1300" in err.value.detail


def test_config_files_presets_and_errors(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text(
        'preset = "lenient"\nchunk_size = 7\n[quality]\ntier_edges = [5.4, 5.9, 6.4, 6.7]\n[buckets]\nsoft_cap = 0.5\n'
    )
    cfg = CurateConfig.from_file(toml)
    assert cfg.chunk_size == 7 and cfg.quality.min_score == 0.0 and cfg.quality.tier_edges == (5.4, 5.9, 6.4, 6.7)
    assert cfg.buckets.soft_cap == 0.5 and cfg.dedup.hamming_below == 5
    js = tmp_path / "c.json"
    js.write_text(json.dumps(cfg.to_dict()))
    assert CurateConfig.from_file(js) == cfg
    js.write_text('{"quality": {"blurr": 1}}')
    with pytest.raises(ValueError, match="'quality.blurr'"):
        CurateConfig.from_file(js)
    js.write_text('{"captions": {"keep_above": 0.2}}')
    with pytest.raises(ValueError, match="synthesize_below <= captions.keep_above"):
        CurateConfig.from_file(js)
    with pytest.raises(ValueError, match="unknown curation preset 'fast'"):
        CurateConfig.preset("fast")
    with pytest.raises(ValueError, match="expected one of"):
        quality.load_scorer("not-a-scorer")
