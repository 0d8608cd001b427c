"""`nucleus bench geneval`: the packaged 553 prompts, GenEval's folder layout with seeds, exact resume, refusal to
mix settings, and compositional scoring of a synthetic-domain model."""

import hashlib
import json
from pathlib import Path

import pytest
from generation_fixtures import tiny_own_pipeline

from nucleus_image.cli import main
from nucleus_image.eval.geneval_bench import (
    GENEVAL_LICENSE,
    NUM_GENEVAL_PROMPTS,
    is_synthetic_domain,
    packaged_file,
    read_prompts,
    scorable_here,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks" / "geneval"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "pipeline"
    tiny_own_pipeline().save_pretrained(path)
    return path


def test_packaged_geneval_prompts():
    records = read_prompts()
    assert len(records) == NUM_GENEVAL_PROMPTS
    assert {r["tag"] for r in records} == {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    }
    assert "MIT License" in packaged_file(GENEVAL_LICENSE).read_text()
    if (SHARED / "evaluation_metadata.jsonl").exists():  # the vendored copy is the benchmark's file, byte for byte
        assert (
            packaged_file("geneval_evaluation_metadata.jsonl").read_bytes()
            == (SHARED / "evaluation_metadata.jsonl").read_bytes()
        )
    assert not scorable_here(records[:5])  # COCO classes: GenEval's own detector scores these


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_geneval_layout_seeds_and_exact_resume(model_dir, tmp_path, capsys):
    assert is_synthetic_domain(model_dir)
    out = tmp_path / "geneval"
    args = [
        "bench",
        "geneval",
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--prompts",
        str(packaged_file("geneval_evaluation_metadata.jsonl")),
        "--limit",
        "3",
        "--samples",
        "2",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    records = read_prompts()[:3]
    for i, record in enumerate(records):
        folder = out / f"{i:05d}"
        assert json.loads((folder / "metadata.jsonl").read_text()) == record
        assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png"]
        assert json.loads((folder / "seeds.json").read_text()) == {"0000.png": 2 * i, "0001.png": 2 * i + 1}
    assert not (out / "report.json").exists()  # COCO prompts are not scored here
    before = {p: digest(p) for p in out.rglob("*.png")}
    removed = out / "00001" / "samples" / "0001.png"
    removed.unlink()
    assert main(args) == 0
    assert "1 images written, 5 already there" in capsys.readouterr().out
    after = {p: digest(p) for p in out.rglob("*.png")}
    assert after == before  # the regenerated image is the same bytes: its seed alone decides it
    assert main(args[:-4] + ["--steps", "3", "--device", "cpu"]) == 2
    assert "other settings (steps" in capsys.readouterr().err


def test_synthetic_model_is_scored_with_the_compositional_scorer(model_dir, tmp_path, capsys):
    out = tmp_path / "synthetic"
    assert (
        main(
            [
                "bench",
                "geneval",
                "--model",
                str(model_dir),
                "--out",
                str(out),
                "--per-task",
                "1",
                "--samples",
                "1",
                "--steps",
                "2",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["images"] == 6 and len(report["per_prompt"]) == 6 and 0.0 <= report["overall"] <= 1.0
    assert "overall" in capsys.readouterr().out
    assert (
        main(
            [
                "bench",
                "geneval",
                "--model",
                str(model_dir),
                "--out",
                str(tmp_path / "x"),
                "--score",
                "compositional",
                "--limit",
                "1",
                "--prompts",
                str(packaged_file("geneval_evaluation_metadata.jsonl")),
            ]
        )
        == 2
    )
