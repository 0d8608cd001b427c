"""The compositional scorer: GenEval's rules, the exact shape detector, ground truth >= 0.98, noise ~0."""

import json

import numpy as np
import pytest
from PIL import Image, ImageFilter

from nucleus_image.cli import main
from nucleus_image.data.synthetic import TASKS, ground_truth_images, heldout_metadata, make_example, relative_position
from nucleus_image.eval.compositional import evaluate, read_geneval_folder, score, score_folder, write_geneval_folder
from nucleus_image.eval.shape_detector import Detection, detect


@pytest.fixture(scope="module")
def heldout():
    records = heldout_metadata(0, per_task=12)
    return records, ground_truth_images(records, samples=2, seed=0)


def test_ground_truth_scores_at_least_098_on_every_task(heldout):
    records, images = heldout
    report = score(records, images)
    assert set(report["tasks"]) == set(TASKS) and report["images"] == 2 * len(records)
    assert report["overall"] >= 0.98, report["tasks"]
    assert min(t["accuracy"] for t in report["tasks"].values()) >= 0.95
    # Blurred and halved (what a small model's samples look like) the ground truth still scores high.
    soft = [
        [im.resize((im.width // 2, im.height // 2), Image.BILINEAR).filter(ImageFilter.GaussianBlur(1.0)) for im in ims]
        for ims in images
    ]
    assert score(records, soft)["overall"] >= 0.95


def test_pure_noise_scores_about_zero(heldout):
    records, _ = heldout
    rng = np.random.default_rng(0)
    noise = [[rng.integers(0, 256, (128, 128, 3), dtype=np.uint8) for _ in range(2)] for _ in records]
    report = score(records, noise)
    assert report["overall"] <= 0.02 and report["images"] == 2 * len(records)
    blank = [[Image.new("RGB", (128, 128), (240, 240, 240))] for _ in records]
    assert score(records, blank)["overall"] == 0.0
    # What an untrained 32 px model paints: token-sized (4 px) blobs of colour on a pale ground. Each blob would
    # pass as a small square or circle if the detector accepted objects far below the domain's smallest.
    blobs = []
    for _ in records:
        grid = np.full((8, 8, 3), 235.0) + rng.normal(0, 6, (8, 8, 3))
        spots = rng.random((8, 8)) < 0.3
        grid[spots] = rng.uniform(0, 255, (int(spots.sum()), 3))
        blobs.append(
            [Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8)).resize((32, 32), Image.NEAREST) for _ in range(2)]
        )
    assert score(records, blobs)["overall"] <= 0.03


def test_detector_recovers_every_object_exactly():
    for i in range(40):
        scene, image, _ = make_example(21, i)
        dets = detect(image)
        assert sorted((d.shape, d.color) for d in dets) == sorted((o.shape, o.color) for o in scene.objects), i
        for obj in scene.objects:  # boxes within 1.5 px of the truth (sharp tips lose their last part-pixel)
            assert any(d.shape == obj.shape and np.abs(np.subtract(d.bbox, obj.bbox)).max() <= 1.5 for d in dets)
        assert all(0.75 <= d.score <= 1.0 for d in dets)  # soft IoU; small stars match least well


def _one_object(shape, rgb, size=32, background=(236, 226, 202), blur=0.0, noise=0.0, seed=0):
    """One object at 45% of the side, anti-aliased like the generator, then blurred and noised."""
    from PIL import ImageDraw

    from nucleus_image.data.synthetic import draw_shape

    ss = 4
    canvas = Image.new("RGB", (size * ss, size * ss), background)
    half = 0.225 * size * ss
    c = size * ss / 2
    draw_shape(ImageDraw.Draw(canvas), shape, (c - half, c - half * 0.9, c + half, c + half * 1.1), rgb)
    image = canvas.reduce(ss)
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(image, dtype=np.float32) + np.random.default_rng(seed).normal(0, noise, (size, size, 3))
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _fade(rgb, amount, background=(236, 226, 202)):
    return tuple(round(b + amount * (c - b)) for c, b in zip(rgb, background))


@pytest.mark.parametrize("size", [32, 64])
def test_detection_is_colour_blind_and_colour_is_a_forced_choice(size):
    """GenEval's split: objects are found whatever their colour (faded, grey, off-palette, noisy, blurred),
    so colour-free tasks pass them; the colour task then fails only when the hue is wrong."""
    from nucleus_image.data.synthetic import COLORS, SHAPES

    def verdict(tag, shape, image, color=None):
        entry = {"class": shape, "count": 1, **({"color": color} if color else {})}
        return evaluate({"tag": tag, "include": [entry]}, detect(image))

    for k, shape in enumerate(SHAPES):
        red, blue = COLORS["red"], COLORS["blue"]
        variants = {
            "faded to half contrast": _one_object(shape, _fade(red, 0.5), size),
            "grey (off the palette)": _one_object(shape, (120, 120, 120), size),
            "off-palette red": _one_object(shape, (235, 70, 55), size),
            "noisy": _one_object(shape, red, size, noise=12.0, seed=k),
            "slightly blurred": _one_object(shape, red, size, blur=size / 48),
        }
        for name, image in variants.items():
            assert verdict("single_object", shape, image) == (True, []), (shape, name, detect(image))
            if name != "grey (off the palette)":
                assert verdict("colors", shape, image, "red")[0], (shape, name, detect(image))
        ok, reasons = verdict("colors", shape, _one_object(shape, _fade(blue, 0.6), size), "red")
        assert not ok and reasons == [f"expected red {shape}>=1, found ['blue']"]


def _det(shape, color, cx, cy, size=20.0, score=0.9):
    h = size / 2
    return Detection(shape, color, (cx - h, cy - h, cx + h, cy + h), int(size * size), score)


def test_geneval_rules():
    two = {
        "tag": "counting",
        "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 3}],
    }
    assert evaluate(two, [_det("circle", "red", 20, 20), _det("circle", "blue", 80, 20)]) == (True, [])
    ok, reasons = evaluate(two, [_det("circle", "red", 20, 20)] * 3)
    assert not ok and reasons == ["expected circle<3, found 3"]
    assert not evaluate(two, [_det("circle", "red", 20, 20), _det("square", "red", 80, 20)])[0]
    # Extra objects are allowed unless excluded; colour is checked on the most confident `count` detections.
    color = {"tag": "colors", "include": [{"class": "star", "count": 1, "color": "green"}]}
    assert evaluate(color, [_det("star", "green", 20, 20, score=0.95), _det("star", "red", 80, 20, score=0.8)])[0]
    assert not evaluate(color, [_det("star", "red", 20, 20, score=0.95), _det("star", "green", 80, 20, score=0.8)])[0]
    pos = {
        "tag": "position",
        "include": [{"class": "square", "count": 1}, {"class": "star", "count": 1, "position": ["left of", 0]}],
    }
    assert evaluate(pos, [_det("square", "red", 90, 50), _det("star", "blue", 20, 55)])[0]
    ok, reasons = evaluate(pos, [_det("square", "red", 20, 50), _det("star", "blue", 90, 50)])
    assert not ok and "expected star left of target" in reasons[0]
    ok, reasons = evaluate(pos, [_det("star", "blue", 20, 50)])
    assert not ok and reasons == ["expected square>=1, found 0", "no target for star to be left of"]
    # GenEval's relative_position: a clear diagonal gives two relations; overlapping centres give none.
    assert relative_position((0, 0, 10, 10), (50, 50, 60, 60)) == {"left of", "above"}
    assert relative_position((0, 0, 10, 10), (1, 1, 11, 11)) == set()
    assert relative_position((0, 40, 10, 50), (50, 38, 60, 48)) == {"left of"}


def test_bad_metadata_is_refused_before_scoring():
    with pytest.raises(ValueError, match=r"class 'dog' not one of .*circle"):
        score([{"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a dog"}], [[]])
    with pytest.raises(ValueError, match=r"tag 'shapes'"):
        score([{"tag": "shapes", "include": [{"class": "star", "count": 1}]}], [[]])
    with pytest.raises(ValueError, match=r"position \['near', 0\]"):
        score(
            [
                {
                    "tag": "position",
                    "include": [{"class": "star", "count": 1}, {"class": "cross", "count": 1, "position": ["near", 0]}],
                }
            ],
            [[]],
        )
    with pytest.raises(ValueError, match="image lists for 2 prompts but 1"):
        score(heldout_metadata(0, 1)[:1], [[], []])


def test_folder_round_trip_cli_and_corrupt_images(heldout, tmp_path, capsys):
    records, images = heldout[0][::6], heldout[1][::6]
    folder = write_geneval_folder(tmp_path / "samples", records, images)
    got_records, paths = read_geneval_folder(folder)
    assert got_records == records and all(len(p) == 2 for p in paths)
    direct = score(records, images)
    (folder / "00000" / "samples" / "0002.png").write_bytes(b"not a png")
    from_folder = score_folder(folder, progress=False)
    assert from_folder["overall"] == direct["overall"] and from_folder["images"] == direct["images"]
    assert len(from_folder["skipped"]) == 1 and "0002.png" in from_folder["skipped"][0]["image"]

    assert main(["eval", "compositional", "--images", str(folder), "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["overall"] == direct["overall"] and len(report["per_prompt"]) == len(records)
    assert Image.open(tmp_path / "report" / "detections.png").size[0] > 0
    assert "overall" in capsys.readouterr().out

    (folder / "00001" / "metadata.jsonl").write_text(
        json.dumps({"tag": "colors", "include": [{"class": "star", "count": 1, "color": "teal"}]}) + "\n"
    )
    assert main(["eval", "compositional", "--images", str(folder), "--out", str(tmp_path / "r2")]) == 2
    assert "'teal' not one of" in capsys.readouterr().err


@pytest.mark.heavy
def test_cli_model_mode_samples_and_scores(tmp_path):
    import torch

    from nucleus_image.encoders.minilm import MiniLMTextEncoder
    from nucleus_image.encoders.pixel import PixelAutoencoder
    from nucleus_image.model import NucleusConfig, NucleusTransformer
    from nucleus_image.pipeline import NucleusPipeline

    torch.manual_seed(0)
    transformer = NucleusTransformer(NucleusConfig.preset("tiny")).eval()
    with torch.no_grad():  # past the adaLN-zero init, so samples are not flat
        for p in transformer.parameters():
            if p.ndim >= 2 and p.abs().max() == 0:
                p.normal_(0.0, 0.02)
    pipe = NucleusPipeline(transformer, PixelAutoencoder(factor=2), MiniLMTextEncoder(), sample_size=32)
    pipe.save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in heldout_metadata(0, 1)[:2]))
    out = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                "compositional",
                "--model",
                str(tmp_path / "model"),
                "--prompts",
                str(prompts),
                "--samples",
                "2",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    records, paths = read_geneval_folder(out / "images")
    assert len(records) == 2 and all(len(p) == 2 for p in paths)
    sample = np.asarray(Image.open(paths[0][0]))
    assert sample.shape == (32, 32, 3) and sample.std() > 0
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 4 and set(report["tasks"]) == {"single_object", "two_object"}


def test_intervals_are_wilson_per_task_and_printed_with_the_score():
    from nucleus_image.eval.compositional import format_summary, overall_interval, summarize, wilson_interval

    # Reference values of the 95% Wilson score interval.
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(384, 384)[0] > 0.99 and wilson_interval(192, 384)[1] - 0.5 < 0.05
    per_prompt = [
        {"tag": "single_object", "correct": [True] * 30 + [False] * 10},
        {"tag": "colors", "correct": [True] * 5 + [False] * 35},
    ]
    report = summarize(per_prompt)
    assert report["tasks"]["single_object"]["interval"] == pytest.approx(list(wilson_interval(30, 40)))
    lo, hi = report["overall_interval"]
    assert report["overall"] == pytest.approx((0.75 + 0.125) / 2)
    assert lo < report["overall"] < hi and hi - lo < 0.2
    assert (lo, hi) == overall_interval(report["tasks"])
    text = format_summary(report)
    assert "[0.598, 0.858]" in text and "Wilson" in text
