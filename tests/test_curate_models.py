"""Curation with learned models, run from model folders as a user would give them (tiny random CLIP and LLaVA
saved with save_pretrained, see curate_models): the manifest's scores, tiers and captions match the models run
directly, provenance names each folder by digest, and a missing or broken folder is refused before any image."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import curate_models
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from nucleus_image import cli
from nucleus_image.data.curate import CurateConfig, analyse, curate, model_folders, quality
from nucleus_image.data.manifest import read_manifest


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    clip = curate_models.clip_folder(root / "clip")
    llava = curate_models.llava_folder(root / "llava")
    table = curate_models.synth_inputs(root / "synth")
    cfg = curate_models.model_cfg(clip, llava)
    result = curate([str(table)], root / "out", cfg, progress=False)
    return {"clip": clip, "llava": llava, "table": table, "cfg": cfg, "result": result, "root": root}


def _analysis_copy(path: str, cfg: CurateConfig, side: int):
    from nucleus_image.data.curate.validate import decode

    rgb, _ = decode(Path(path).read_bytes(), cfg.validate)
    return quality.analysis_copy(rgb, side)


def _captions_in_input_order(row: dict, table: Path) -> list[str]:
    """The captions of a manifest row in the order the caption records list them: the table's (cleaned, without
    repeats), then the generated ones, short to detailed. (The manifest's own order is by score.)"""
    given = next(
        r["captions"] for r in pq.read_table(table).to_pylist() if Path(row["image_path"]).name in r["image_path"]
    )
    texts = list(dict.fromkeys(" ".join(c.split()) for c in given))
    vlm = {s.rsplit(":", 1)[-1]: t for t, s in zip(row["captions"], row["caption_sources"]) if s.startswith("vlm:")}
    return texts + [vlm[g] for g in ("short", "medium", "detailed") if g in vlm]


def _check_similarities(row: dict, table: Path, image_1D, text_embed, to_score) -> None:
    texts = _captions_in_input_order(row, table)
    records = json.loads(row["annotations"])["curation"]["captions"]
    cos = (image_1D @ text_embed(texts).T)[0].tolist()
    got = [c["score"] for c in records[: len(texts)]]
    np.testing.assert_allclose(got, [to_score(c) for c in cos], atol=2e-4)
    assert len(texts) == 1 or len(set(got)) > 1  # a score per caption, not one per image


def test_scores_tiers_and_captions_match_the_models_run_directly(run):
    from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPModel

    cfg, m = run["cfg"], read_manifest(run["result"].version_dir).to_pylist()
    rejects = pq.read_table(run["result"].version_dir / "rejects").column("reason").to_pylist()
    assert set(rejects) <= {"blurry", "histogram_anomaly"}  # flat synthetic shapes; the model stages keep all
    assert run["result"].kept == len(m) == 10 - len(rejects) >= 6
    model = CLIPModel.from_pretrained(run["clip"], use_safetensors=True).eval()
    processor = AutoProcessor.from_pretrained(run["clip"])
    head = load_file(str(run["clip"] / "aesthetic_head.safetensors"))
    scores = []
    for r in m:
        small = _analysis_copy(r["image_path"], cfg, cfg.quality.analysis_side)
        with torch.no_grad():
            img = model.get_image_features(
                **processor.image_processor(images=[small], return_tensors="pt")
            ).pooler_output
            img = torch.nn.functional.normalize(img, dim=-1)
            x = img
            for i in curate_models.HEAD_LAYERS:
                x = x @ head[f"layers.{i}.weight"].T + head[f"layers.{i}.bias"]

            def text_embed(texts):
                tokens = processor.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
                return torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)

            _check_similarities(r, run["table"], img, text_embed, lambda c: (c + 1.0) / 2.0)
        np.testing.assert_allclose(r["quality_score"], x.item(), rtol=1e-5, atol=1e-5)
        scores.append(x.item())
        assert r["tier"] == 1 + np.searchsorted(curate_models.EDGES, r["quality_score"], side="right")
    assert len({round(s, 4) for s in scores}) == len(scores)  # one score per image, not a constant

    # Every image got three VLM captions (captioner.when = "always"), equal to the model's greedy output.
    label = model_folders.folder_info(run["llava"]).label
    vlm_model = AutoModelForImageTextToText.from_pretrained(run["llava"], use_safetensors=True).eval()
    vlm_proc = AutoProcessor.from_pretrained(run["llava"])
    captioned = [r for r in m if any(s.startswith("vlm:") for s in r["caption_sources"])]
    assert len(captioned) == len(m)
    r = captioned[0]
    small = _analysis_copy(r["image_path"], cfg, cfg.captioner.image_side)
    for name, prompt, tokens in zip(
        ("short", "medium", "detailed"), cfg.captioner.prompts, cfg.captioner.max_new_tokens
    ):
        text = vlm_proc.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
            add_generation_prompt=True,
        )
        inputs_ = vlm_proc(images=[small], text=[text], return_tensors="pt")
        out = vlm_model.generate(**inputs_, max_new_tokens=tokens, do_sample=False)
        want = vlm_proc.batch_decode(out[:, inputs_["input_ids"].shape[1] :], skip_special_tokens=True)[0]
        want = " ".join("".join(c for c in want if unicodedata.category(c) != "Cc").split())  # control chars dropped
        source = f"vlm:{label}:{name}"
        if want:
            assert r["captions"][r["caption_sources"].index(source)] == want
    ann = json.loads(r["annotations"])["curation"]
    assert ann["captioner"] == label and ann["quality_scorer"].startswith("clip-aesthetic:clip@")
    # Provenance: every folder by path and full digest.
    meta = json.loads(
        pq.read_schema(next(run["result"].version_dir.glob("part-*.parquet"))).metadata[b"nucleus_provenance"]
    )
    assert meta["models"]["captioner.model"]["sha256"] == model_folders.folder_info(run["llava"]).sha256
    assert set(meta["models"]) == {"quality.model", "captions.model", "captioner.model"}
    stats = json.loads((run["result"].version_dir / "stats.json").read_text())
    assert stats["captions"]["generated"] == sum(s.startswith("vlm:") for r in m for s in r["caption_sources"]) > 0


def test_siglip_folder_scores_like_the_model_run_directly(run, tmp_path):
    from transformers import AutoProcessor, SiglipModel

    folder = curate_models.siglip_folder(tmp_path / "siglip")
    cfg = CurateConfig.from_dict(
        {
            "preset": "lenient",
            "workers": 1,
            "chunk_size": 4,
            "quality": {"model": str(folder)},
            "captions": {
                "model": str(folder),
                "synthesize_below": 0.0,
                "keep_above": 0.5,
                "similarity_range": [-0.5, 0.5],
            },
        }
    )
    rows = read_manifest(curate([str(run["table"])], tmp_path / "out", cfg, progress=False).version_dir).to_pylist()
    model = SiglipModel.from_pretrained(folder, use_safetensors=True).eval()
    processor = AutoProcessor.from_pretrained(folder)
    head = load_file(str(folder / "aesthetic_head.safetensors"))
    for r in rows:
        small = _analysis_copy(r["image_path"], cfg, cfg.quality.analysis_side)
        with torch.no_grad():
            pixels = processor.image_processor(images=[small], return_tensors="pt")["pixel_values"]
            img = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)

            def text_embed(texts):
                tokens = processor.tokenizer(
                    texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt"
                )
                return torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)

            _check_similarities(r, run["table"], img, text_embed, lambda c: min(1.0, max(0.0, c + 0.5)))
        np.testing.assert_allclose(r["quality_score"], (img @ head["weight"].T + head["bias"]).item(), rtol=1e-5)
    assert json.loads(rows[0]["annotations"])["curation"]["caption_scorer"].startswith("clip-similarity:siglip@")


def test_captioner_writes_only_where_needed(run, tmp_path):
    """With the text heuristic scoring captions, exactly the images whose captions are all file names (every
    third) are captioned; their new captions are scored and routed like any other."""
    cfg = CurateConfig.from_dict(
        {
            "preset": "lenient",
            "workers": 1,
            "chunk_size": 4,
            "captioner": {"model": str(run["llava"]), "max_new_tokens": [4, 4, 4]},
        }
    )
    result = curate([str(run["table"])], tmp_path, cfg, progress=False)
    names = [Path(r["image_path"]).name for r in pq.read_table(run["table"]).to_pylist()]
    file_named = {names[i] for i in range(0, len(names), 3)}
    got = set()
    for r in read_manifest(result.version_dir).to_pylist():
        records = json.loads(r["annotations"])["curation"]["captions"]
        if any(c["source"].startswith("vlm:") for c in records):
            got.add(Path(r["image_path"]).name)
    kept = {Path(r["image_path"]).name for r in read_manifest(result.version_dir).to_pylist()}
    assert got == file_named & kept  # kept file-named images hold a generated caption; no other image does
    # The random model's captions read as noise, so the text heuristic drops them too: such an image is rejected
    # with its own caption and the three generated ones counted.
    rejects = {Path(r["source"]).name: r for r in pq.read_table(result.version_dir / "rejects").to_pylist()}
    no_caption = {name for name, r in rejects.items() if r["reason"] == "no_caption"}
    assert no_caption <= file_named and all(rejects[n]["detail"].startswith("all 4 captions") for n in no_caption)
    assert file_named - kept - no_caption <= {n for n, r in rejects.items() if r["stage"] == "quality"}
    assert len(no_caption) + len(got) >= 2


def test_no_models_means_the_heuristic_stages(run, tmp_path):
    cfg = CurateConfig.from_dict({"preset": "lenient", "workers": 1, "chunk_size": 4})
    assert analyse.stage_names(cfg) == {
        "quality": "image-statistics-heuristic",
        "captions": "caption-text-heuristic",
        "captioner": None,
    }
    result = curate([str(run["table"])], tmp_path, cfg, progress=False)
    rows = read_manifest(result.version_dir).to_pylist()
    assert rows and not any(s.startswith("vlm:") for r in rows for s in r["caption_sources"])
    meta = pq.read_schema(next(result.version_dir.glob("part-*.parquet"))).metadata[b"nucleus_provenance"]
    assert "models" not in json.loads(meta) and json.loads(meta)["config"]["captioner"]["model"] is None


def _broken(root: Path, clip: Path, llava: Path) -> list[tuple[str, Path, str]]:
    """(config key, folder, what the error must say) for each way a folder can be wrong."""
    import shutil

    def copy(src: Path, name: str) -> Path:
        dst = root / name
        shutil.copytree(src, dst)
        return dst

    cases = [("quality.model", root / "nowhere", "does not exist")]
    no_config = copy(clip, "no_config")
    (no_config / "config.json").unlink()
    cases.append(("captions.model", no_config, "has no config.json"))
    bad_json = copy(clip, "bad_json")
    (bad_json / "config.json").write_text("{not json")
    cases.append(("quality.model", bad_json, "config.json is not a model config"))
    pickled = copy(clip, "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    cases.append(("quality.model", pickled, "only pickled weights ['pytorch_model.bin']"))
    truncated = copy(clip, "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append(("captions.model", truncated, "model.safetensors is not a readable safetensors file"))
    no_head = copy(clip, "no_head")
    (no_head / "aesthetic_head.safetensors").unlink()
    cases.append(("quality.model", no_head, "has no aesthetic_head.safetensors"))
    wide_head = copy(clip, "wide_head")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(1, 32), "bias": torch.zeros(1)}, str(wide_head / "aesthetic_head.safetensors"))
    cases.append(("quality.model", wide_head, "the image embedding is 16 wide"))
    cases.append(("quality.model", llava, "model_type 'llava' is not one of ['clip', 'siglip']"))
    cases.append(("captioner.model", clip, "model_type 'clip' is not an image-text-to-text model"))
    sharded = root / "sharded"
    from transformers import CLIPModel

    CLIPModel.from_pretrained(clip, use_safetensors=True).save_pretrained(sharded, max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copy(clip / name, sharded / name)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    model_folders.check_folder(sharded, "captions.model")  # a sharded folder is fine...
    next(sharded.glob("model-*.safetensors")).unlink()
    cases.append(("captions.model", sharded, "weight shards listed in model.safetensors.index.json are missing"))
    no_processor = copy(clip, "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_processor / name).unlink()
    cases.append(("captions.model", no_processor, "has no tokenizer files"))
    bad_processor = copy(clip, "bad_processor")
    (bad_processor / "processor_config.json").write_text("{truncated")
    cases.append(("captions.model", bad_processor, "its processor does not load"))
    no_template = copy(llava, "no_template")
    (no_template / "chat_template.jinja").unlink()
    cases.append(("captioner.model", no_template, "has no chat template"))
    return cases


def test_bad_model_folders_refused_before_any_image_is_read(run, tmp_path, monkeypatch, capsys):
    def never(*a, **k):
        raise AssertionError("an input was read before the model folders were checked")

    monkeypatch.setattr("nucleus_image.data.curate.run.enumerate_inputs", never)
    monkeypatch.setattr(analyse, "read_image_bytes", never)
    for key, folder, message in _broken(tmp_path, run["clip"], run["llava"]):
        table, field = key.split(".")
        cfg = CurateConfig.from_dict({"workers": 1, table: {field: str(folder)}})
        with pytest.raises(ValueError) as err:
            curate([str(run["table"])], tmp_path / "out", cfg, progress=False)
        assert f"{key} '{folder.resolve()}'" in str(err.value) and message in str(err.value), str(err.value)
        assert "expected" in str(err.value)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(cli, "COMMANDS", ("data",))
    args = ["data", "curate", str(run["table"]), "--out", str(tmp_path / "o"), "--aesthetic-model", str(run["llava"])]
    assert cli.main(args) == 2
    assert "quality.model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="give quality.scorer or quality.model, not both"):
        CurateConfig.from_dict({"quality": {"model": str(run["clip"]), "scorer": "x.y:Z"}})


def test_cli_model_flags_with_relative_folders(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", ("data",))
    monkeypatch.chdir(run["root"])
    config = tmp_path / "c.toml"
    config.write_text('preset = "lenient"\n[captions]\nsynthesize_below = 0.0\nkeep_above = 0.5\n')  # keep all
    args = ["data", "curate", str(run["table"]), "--out", str(tmp_path / "ds"), "--config", str(config), "--quiet"]
    assert cli.main([*args, "--aesthetic-model", "clip", "--clip-model", "clip", "--workers", "1"]) == 0
    assert "captions  keep" in capsys.readouterr().out
    version = tmp_path / "ds" / "manifest-v0001"
    saved = json.loads((version / "curate_config.json").read_text())
    assert saved["quality"]["model"] == saved["captions"]["model"] == str(run["clip"].resolve())
    label = model_folders.folder_info(run["clip"]).label
    ann = json.loads(read_manifest(version).column("annotations")[0].as_py())["curation"]
    assert (ann["quality_scorer"], ann["caption_scorer"]) == (f"clip-aesthetic:{label}", f"clip-similarity:{label}")


def test_a_model_folder_changed_in_place_is_a_new_run(run, tmp_path):
    """Same config, new weights in the same folder: a new fingerprint and a reloaded model, so new scores."""
    import shutil

    folder = tmp_path / "clip"
    shutil.copytree(run["clip"], folder)
    cfg = CurateConfig.from_dict(
        {"preset": "lenient", "workers": 1, "chunk_size": 4, "quality": {"model": str(folder)}}
    )
    first = read_manifest(curate([str(run["table"])], tmp_path / "out", cfg, progress=False).version_dir)
    curate_models.clip_folder(folder, seed=5)
    second = read_manifest(curate([str(run["table"])], tmp_path / "out", cfg, progress=False).version_dir)
    assert first.column("sha256").equals(second.column("sha256"))
    assert not np.allclose(first.column("quality_score").to_numpy(), second.column("quality_score").to_numpy())
    labels = {json.loads(t.column("annotations")[0].as_py())["curation"]["quality_scorer"] for t in (first, second)}
    assert len(labels) == 2
