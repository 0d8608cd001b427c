"""The synthetic compositional domain: determinism, manifest contents, scene geometry, captions, held-out set."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from nucleus_image.cli import main
from nucleus_image.data.captions import CAPTION_SOURCES, geneval_prompt, noun_phrase
from nucleus_image.data.manifest import read_manifest
from nucleus_image.data.synthetic import (
    ASPECT_RATIOS,
    RELATIONS,
    SHAPES,
    TASKS,
    SynthConfig,
    generate_dataset,
    heldout_metadata,
    make_example,
    relative_position,
    sample_scene,
    scene_rng,
)
from nucleus_image.eval.compositional import validate_records


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_dataset(root / "a", 48, seed=7, progress=False)
    generate_dataset(root / "b", 48, seed=7, progress=False)
    return root


def test_same_seed_writes_byte_identical_files(dataset):
    a, b = _files(dataset / "a"), _files(dataset / "b")
    assert a.keys() == b.keys() and len([k for k in a if k.startswith("images/")]) == 48
    assert all(a[k] == b[k] for k in a)


def test_image_depends_only_on_seed_and_index():
    _, im1, cap1 = make_example(3, 5)
    _, im2, cap2 = make_example(3, 5)
    _, im3, _ = make_example(4, 5)
    assert np.array_equal(np.asarray(im1), np.asarray(im2)) and cap1 == cap2
    assert not np.array_equal(np.asarray(im1), np.asarray(im3))


def test_manifest_rows_match_their_images(dataset):
    root = dataset / "a"
    table = read_manifest(root)  # validates schema, tier/bucket ranges, caption/source lengths
    assert table.num_rows == 48
    for row in table.to_pylist():
        data = (root / row["image_path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and row["image_id"] == row["sha256"][:32]
        with Image.open(root / row["image_path"]) as im:
            assert im.size == (row["width"], row["height"]) and im.mode == "RGB"
        assert row["caption_sources"] == list(CAPTION_SOURCES) and len(row["captions"]) == 4
        lengths = [len(c) for c in row["captions"]]
        assert lengths == sorted(lengths), row["captions"]  # granularities grow from short to paragraph
        assert row["captions"][0].count(".") == 0 and row["captions"][1].count(".") == 2
        ann = json.loads(row["annotations"])
        for obj in ann["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            assert 0 <= x0 < x1 <= row["width"] and 0 <= y0 < y1 <= row["height"]
            assert obj["shape"] in SHAPES and obj["shape"] in row["captions"][3]
        n = len(ann["objects"])
        expected_bucket = {
            "single_object": 1,
            "colors": 2,
            "two_object": 3,
            "color_attr": 5,
            "position": 7,
            "counting": {2: 4, 3: 6, 4: 8}.get(n),
        }[ann["task"]]
        assert row["bucket"] == expected_bucket
        assert row["tier"] == (expected_bucket + 1) // 2 + (ann["texture"] != "plain")
    meta = pq.read_schema(next((root / "manifest-v0001").glob("*.parquet"))).metadata
    assert json.loads(meta[b"nucleus_provenance"])["seed"] == 7


def test_scenes_cover_every_task_and_aspect_with_valid_geometry():
    config = SynthConfig()
    scenes = [sample_scene(scene_rng(11, i), config) for i in range(400)]
    assert {s.task for s in scenes} == set(TASKS)
    assert {s.aspect for s in scenes} == set(ASPECT_RATIOS)
    assert {len(s.objects) for s in scenes if s.task == "counting"} == {2, 3, 4}
    assert {s.relation[0] for s in scenes if s.task == "position"} == set(RELATIONS)
    for s in scenes:
        assert (s.width, s.height) == config.image_size(s.aspect) and min(s.width, s.height) == 128
        for i, a in enumerate(s.objects):
            x0, y0, x1, y1 = a.bbox
            assert 0 < x0 and x1 < s.width and 0 < y0 and y1 < s.height
            for b in s.objects[i + 1 :]:  # boxes never touch, so counts are unambiguous
                assert abs(a.cx - b.cx) >= (a.size + b.size) / 2 or abs(a.cy - b.cy) >= (a.size + b.size) / 2
        if s.task == "position":
            rel, subj, ref = s.relation
            assert relative_position(s.objects[subj].bbox, s.objects[ref].bbox) == {rel}
        if s.task in ("two_object", "color_attr", "position"):
            assert s.objects[0].shape != s.objects[1].shape
        if s.task == "color_attr":
            assert s.objects[0].color != s.objects[1].color


def test_captions_state_what_the_scene_shows():
    for i in range(60):
        scene, _, caps = make_example(2, i)
        short = caps[0]
        if scene.task == "counting":
            assert noun_phrase(scene.objects[0].shape, len(scene.objects)).split()[0] in short
        if scene.task in ("colors", "color_attr"):
            assert all(f"{o.color} {o.shape}" in short for o in scene.objects)
        if scene.task == "position":
            rel, subj, ref = scene.relation
            subject, reference = scene.objects[subj].shape, scene.objects[ref].shape
            assert short.index(subject) < short.index(reference)
            assert f"the {subject} is" in caps[2].lower() and f"the {subject} is" in caps[3].lower()
        assert scene.background in caps[1] and scene.background in caps[3]


def test_geneval_prompt_phrasing_and_articles():
    assert (
        geneval_prompt(
            {
                "tag": "position",
                "include": [
                    {"class": "circle", "count": 1},
                    {"class": "star", "count": 1, "position": ["right of", 0]},
                ],
            }
        )
        == "a photo of a star right of a circle"
    )
    assert noun_phrase("star", 1, "orange") == "an orange star"
    assert noun_phrase("cross", 3) == "three crosses"


def test_heldout_set_is_geneval_format_and_disjoint_from_training_captions(dataset):
    records = [json.loads(line) for line in (dataset / "a" / "heldout_metadata.jsonl").read_text().splitlines()]
    assert records == heldout_metadata(0, 24)
    validate_records(records)
    assert [r["tag"] for r in records] == sorted((r["tag"] for r in records), key=TASKS.index)
    counts = {t: sum(r["tag"] == t for r in records) for t in TASKS}
    assert counts == {
        "single_object": 6,
        "two_object": 15,
        "counting": 18,
        "colors": 24,
        "position": 24,
        "color_attr": 24,
    }
    assert len({r["prompt"] for r in records}) == len(records)
    for r in records:
        assert set(r) <= {"tag", "include", "exclude", "prompt"} and r["prompt"].startswith("a photo of ")
        if r["tag"] == "counting":
            assert r["exclude"] == [{"class": r["include"][0]["class"], "count": r["include"][0]["count"] + 1}]
    prompts = {r["prompt"] for r in records}
    captions = {c for i in range(300) for c in make_example(1, i)[2]}
    captions |= {c for row in read_manifest(dataset / "a").column("captions").to_pylist() for c in row}
    assert not prompts & captions
    assert heldout_metadata(1, 24) != records and len(heldout_metadata(0, 2)) == 12


def test_cli_synth_and_bad_input(tmp_path, capsys):
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--num", "6", "--seed", "1", "--size", "64"]) == 0
    table = read_manifest(tmp_path / "d")
    assert (
        table.num_rows == 6
        and min(min(w, h) for w, h in zip(table["width"].to_pylist(), table["height"].to_pylist())) == 64
    )
    assert (tmp_path / "d" / "preview.png").exists() and (tmp_path / "d" / "heldout_metadata.jsonl").exists()
    # A second run adds a manifest version instead of overwriting the first.
    assert main(["data", "synth", "--out", str(tmp_path / "d"), "--num", "3", "--seed", "2", "--size", "64"]) == 0
    assert read_manifest(tmp_path / "d").num_rows == 3 and (tmp_path / "d" / "manifest-v0001").is_dir()
    for args, needle in (
        (["--num", "0"], "num 0"),
        (["--num", "2", "--size", "16"], "size 16"),
        (["--num", "2", "--aspects", "5:4"], "5:4"),
    ):
        capsys.readouterr()
        assert main(["data", "synth", "--out", str(tmp_path / "e"), *args]) == 2
        assert needle in capsys.readouterr().err


def test_heldout_repeat_gives_every_task_about_the_same_number_of_records():
    import collections

    from nucleus_image.data.synthetic import TASKS, heldout_metadata

    plain = heldout_metadata(0, 24)
    assert len(plain) == 111  # 6 + 15 + 18 + 24 + 24 + 24: small pools listed once
    records = heldout_metadata(0, 96, repeat=True)
    per_task = collections.Counter(r["tag"] for r in records)
    assert set(per_task) == set(TASKS) and all(96 <= n < 2 * 96 for n in per_task.values())
    shapes = collections.Counter(r["include"][0]["class"] for r in records if r["tag"] == "single_object")
    assert len(shapes) == 6 and set(shapes.values()) == {16}  # whole rounds: every shape equally often
    assert heldout_metadata(0, 96, repeat=True) == records  # deterministic
