"""End-to-end curation on an adversarial corpus with the local engine: every input accounted for with the right
reason, manifest content, inputs untouched, new versions, pluggable scorers, CLI, and resume after a kill."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import curate_corpus
import numpy as np
import pyarrow.parquet as pq
import pytest

from nucleus_image import cli
from nucleus_image.data.curate import CurateConfig, curate
from nucleus_image.data.manifest import (
    REJECT_REASONS,
    latest_version_dir,
    partition_key_for,
    read_manifest,
    read_rejects,
)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _outcomes(out: Path) -> dict[str, str]:
    manifest, rejects = read_manifest(out), read_rejects(out)
    got = {json.loads(a)["curation"]["source"]: "kept" for a in manifest.column("annotations").to_pylist()}
    for source, reason in zip(rejects.column("source").to_pylist(), rejects.column("reason").to_pylist()):
        assert source not in got, f"{source} both kept and rejected"
        got[source] = reason
    return got


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    c = curate_corpus.build(root / "in")
    before = _tree_digest(root / "in")
    c["result"] = curate(c["inputs"], root / "out", CurateConfig(chunk_size=8, workers=2), progress=False)
    c["out"], c["root"], c["before"] = root / "out", root, before
    return c


def test_every_input_lands_in_manifest_or_rejects_with_its_reason(corpus):
    got = _outcomes(corpus["out"])
    assert got == corpus["expect"]
    result = corpus["result"]
    assert result.inputs == len(corpus["expect"]) == result.kept + result.rejected
    assert result.kept == sum(v == "kept" for v in got.values())
    stats = json.loads((result.version_dir / "stats.json").read_text())
    assert stats["inputs"] == result.inputs and stats["funnel"][-1]["remaining"] == result.kept
    assert sum(stats["reasons"].values()) == result.rejected == sum(f["rejected"] for f in stats["funnel"])
    assert sum(stats["tiers"].values()) == sum(stats["buckets"].values()) == result.kept
    rejects = read_rejects(corpus["out"])
    assert set(rejects.column("reason").to_pylist()) <= set(REJECT_REASONS)
    assert all(d for d in rejects.column("detail").to_pylist())  # every rejection says why


def test_manifest_content(corpus):
    out, m = corpus["out"], read_manifest(corpus["out"])
    rows = {json.loads(r["annotations"])["curation"]["source"]: r for r in m.to_pylist()}
    for source, r in rows.items():
        path = Path(r["image_path"]) if Path(r["image_path"]).is_absolute() else out / r["image_path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == r["sha256"], source  # tar members extracted
        assert r["image_id"] == r["sha256"][:32] and r["partition_key"] == partition_key_for(r["sha256"])
        assert 1 <= r["tier"] <= 5 and 1 <= r["bucket"] <= 8 and r["quality_score"] >= 5.0
        assert len(r["captions"]) == len(r["caption_sources"]) >= 1
    assert (rows[corpus["rotated"]]["width"], rows[corpus["rotated"]]["height"]) == (272, 320)  # EXIF applied
    multi = next(r for s, r in rows.items() if s.endswith("multi.png"))
    assert multi["caption_sources"] == ["user", "vlm:qwen"]  # alt-text "IMG_0042.jpg" routed to synthesize
    routes = [c["route"] for c in json.loads(multi["annotations"])["curation"]["captions"]]
    assert routes == ["synthesize", "refine", "keep"]
    para = rows[corpus["paragraph"]]
    assert para["caption_sources"] == [
        "derived:1-sentence:from:original",
        "derived:2-sentence:from:original",
        "derived:3-5-sentence:from:original",
        "original",
    ]
    assert para["captions"][-1] == curate_corpus.PARAGRAPH and para["captions"][0].count(".") == 1
    cafe = rows[corpus["cp1252"]]
    assert cafe["captions"][0].startswith("Café crème")
    assert json.loads(cafe["annotations"])["curation"]["caption_notes"] == ["cafe.txt: decoded as cp1252"]
    assert json.loads(rows[corpus["cmyk"]]["annotations"])["curation"]["mode"] == "CMYK"
    rejects = {r["source"]: r for r in read_rejects(out).to_pylist()}
    assert rejects[corpus["dup_exact"]]["duplicate_of"] == corpus["good"][0]
    assert rejects[corpus["dup_near"]]["duplicate_of"] == corpus["good"][1]  # the larger original survives
    # Shards hold partition_key ranges.
    version = latest_version_dir(out)
    for s, shard in enumerate(sorted(version.glob("part-*.parquet"))):
        keys = np.asarray(pq.read_table(shard).column("partition_key"))
        assert ((keys * 8 >> 31) == s).all()
    assert not (out / ".curate-work").exists()


# Digest of the manifest the built-in heuristics write for this corpus (rows by sha256: score to 6 decimals, tier,
# bucket, captions, sources, annotations less the input path), from before the learned stages existed: a run that
# names no model folder must write exactly this.
HEURISTIC_DIGEST = "076925ce6ef4c84f"


def test_heuristic_default_manifest_is_unchanged(corpus):
    rows = []
    for r in read_manifest(corpus["out"]).to_pylist():
        ann = {k: v for k, v in json.loads(r["annotations"])["curation"].items() if k != "source"}
        rows.append(
            [
                r["sha256"],
                round(r["quality_score"], 6),
                r["tier"],
                r["bucket"],
                r["captions"],
                r["caption_sources"],
                ann,
            ]
        )
    rows.sort(key=lambda row: row[0])
    assert hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16] == HEURISTIC_DIGEST


def test_inputs_untouched_and_rerun_adds_identical_version(corpus, tmp_path):
    assert _tree_digest(corpus["root"] / "in") == corpus["before"]
    out = tmp_path / "out"
    first = curate(corpus["inputs"], out, CurateConfig(workers=1), progress=False)
    second = curate(corpus["inputs"], out, CurateConfig(workers=1), progress=False)
    assert (first.version_dir.name, second.version_dir.name) == ("manifest-v0001", "manifest-v0002")
    assert latest_version_dir(out) == second.version_dir
    assert read_manifest(first.version_dir).equals(read_manifest(second.version_dir))
    assert read_manifest(out).equals(read_manifest(corpus["out"]))  # chunking and worker count change nothing


class ConstantScorer:
    """A stand-in for a learned aesthetic model, loaded through the plugin path."""

    name = "constant-6.9"

    def score(self, images, stats):
        return [6.9 for _ in images]


def test_pluggable_quality_scorer(corpus, tmp_path):
    cfg = CurateConfig.from_dict({"workers": 1, "quality": {"scorer": "test_curate_pipeline:ConstantScorer"}})
    curate(corpus["inputs"], tmp_path, cfg, progress=False)
    m = read_manifest(tmp_path)
    assert set(m.column("tier").to_pylist()) == {5}
    np.testing.assert_allclose(np.asarray(m.column("quality_score")), 6.9, rtol=1e-6)
    outcomes = _outcomes(tmp_path)
    assert [outcomes[s] for s in outcomes if s.endswith("dim.png")] == ["kept"]  # the built-in scorer refused it


def test_cli_curate_and_stats(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", ("data",))  # only the command under test, not its siblings
    main = cli.main
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "recipe"\nworkers = 1\n[buckets]\nsoft_cap = 0.5\n')
    assert (
        main(["data", "curate", *corpus["inputs"], "--out", str(tmp_path / "ds"), "--config", str(cfg), "--quiet"]) == 0
    )
    assert main(["data", "stats", str(tmp_path / "ds")]) == 0
    text = capsys.readouterr().out
    assert f"inputs {len(corpus['expect'])}" in text and "duplicate_near" in text and "A5" in text
    charts = sorted(p.name for p in (tmp_path / "ds" / "manifest-v0001" / "stats").glob("*.png"))
    assert charts == [
        "buckets.png",
        "captions_per_image.png",
        "image_size.png",
        "quality_score.png",
        "reject_reasons.png",
        "tiers.png",
    ]
    assert main(["data", "curate", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["data", "curate", corpus["inputs"][0], "--out", corpus["inputs"][0] + "/inner"]) == 2


def test_resume_after_kill_matches_uninterrupted_run(corpus, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"chunk_size": 1, "workers": 1}))
    out = tmp_path / "out"
    script = "import sys; from nucleus_image import cli; cli.COMMANDS = ('data',); sys.exit(cli.main(sys.argv[1:]))"
    cmd = [
        sys.executable,
        "-c",
        script,
        "data",
        "curate",
        *corpus["inputs"],
        "--out",
        str(out),
        "--config",
        str(cfg),
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob(".curate-work/*/chunks/chunk-*.parquet"))) < 5:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob(".curate-work/*/chunks/chunk-*.parquet")))
    assert 5 <= done < len(corpus["expect"]) and not list(out.glob("manifest-v*")), done
    result = curate(corpus["inputs"], out, CurateConfig.from_file(cfg), progress=False)
    assert result.units == len(corpus["expect"]) and result.units_resumed >= done
    assert read_manifest(out).equals(read_manifest(corpus["out"]))
    assert read_rejects(out).equals(read_rejects(corpus["out"]))
