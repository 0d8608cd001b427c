"""The embedded default's training levers and throughput pieces: contrastive flow matching, the alignment head
(exact per-token maps; training-only: never in the transformer's weights or a merged pipeline; resumed exactly),
decoded images held in memory (same batches), and the phase timing the demo prints."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from training_helpers import micro_config, micro_dataset

from nucleus_image.data.synthetic import SynthConfig, make_example
from nucleus_image.model import NucleusTransformer
from nucleus_image.pipeline.pipeline import pack_latents
from nucleus_image.training.alignment import COLOR_CLASSES, SHAPE_CLASSES, alignment_loss, token_targets
from nucleus_image.training.buckets import fit_image
from nucleus_image.training.data_loader import BatchPlan, RankBatches, rank_loader, read_rows
from nucleus_image.training.loss import contrastive_flow_loss, contrastive_negatives, velocity_target
from nucleus_image.training.trainer import Trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return micro_dataset(tmp_path_factory.mktemp("levers") / "data")


def _train(cfg, data, out, steps, resume=False):
    threads = torch.get_num_threads()
    try:
        run = Trainer(cfg, data, out, max_steps=steps, progress=False, resume=resume)
        return run, run.train()
    finally:
        torch.set_num_threads(threads)


def test_contrastive_pairs_skip_empty_and_equal_captions_and_the_term_is_the_distance_to_the_negative():
    captions = ["a red circle", "", "a blue square", "a blue square", "two stars"]
    index, weight = contrastive_negatives(captions)
    assert index.tolist() == [1, 2, 3, 4, 0]
    # row 0's negative is empty, row 1 is empty, rows 2-3 share a caption; 3 -> 4 and 4 -> 0 count
    assert weight.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    g = torch.Generator().manual_seed(0)
    x0, noise, pred = (torch.randn(5, 6, 4, generator=g) for _ in range(3))
    term = contrastive_flow_loss(pred, x0, noise, index, weight)
    target = velocity_target(x0, noise)
    expected = ((pred[3] - target[4]).pow(2).mean() + (pred[4] - target[0]).pow(2).mean()) / 2
    assert torch.allclose(term, expected, rtol=1e-6)
    assert contrastive_flow_loss(pred, x0, noise, index, torch.zeros(5)).item() == 0.0  # no pair: no term


def test_trainer_subtracts_the_contrastive_term(data):
    from dataclasses import replace

    threads = torch.get_num_threads()
    try:
        run = Trainer(micro_config(contrastive_weight=0.5), data, data.parent / "cfm", max_steps=1, progress=False)
        batch = run._micro_batches(run.cfg.stages[0].batch_size)[0]
        assert batch.negatives is not None  # the trainer pairs the rows
        with torch.no_grad():
            cfm = run.objective(run.model, batch)[0]
            plain = replace(run.objective, contrastive_weight=0.0)(run.model, batch)[0]
    finally:
        torch.set_num_threads(threads)
    assert cfm < plain - 1e-3  # same batch, noise and weights: the loss differs by -0.5 * term


def test_token_targets_mark_each_objects_tokens_with_its_shape_and_colour():
    scene, image, _ = make_example(3, 11, SynthConfig(size=64))
    width, height, token = 32, 24, 4
    targets = token_targets(scene.annotations(), (scene.width, scene.height), width, height, token)
    assert targets.shape == ((height // token) * (width // token), len(SHAPE_CLASSES) + len(COLOR_CLASSES))
    n = len(SHAPE_CLASSES)
    assert np.allclose(targets[:, :n].sum(1), 1) and np.allclose(targets[:, n:].sum(1), 1)
    # The maps lie on the pixels the model sees: tokens the maps call object differ from the background in the
    # fitted picture, in the token order pack_latents gives.
    pixels = fit_image_from(image, width, height)
    patches = pack_latents(pixels[None], token)[0].view(-1, 3, token * token)  # (tokens, 3, px)
    background = torch.tensor(np.median(np.asarray(image, np.float32).reshape(-1, 3), 0))
    contrast = (patches.float() - background[None, :, None]).norm(dim=1).mean(1)
    inside = targets[:, 0] < 0.05
    outside = targets[:, 0] > 0.95
    assert inside.any() and outside.any()
    assert contrast[torch.from_numpy(inside)].min() > 3 * contrast[torch.from_numpy(outside)].max()
    # Each object's colour and shape show up in the maps where the object is.
    for obj in scene.objects:
        assert targets[:, 1 + SHAPE_CLASSES[1:].index(obj.shape)].max() > 0.5
        assert targets[:, n + COLOR_CLASSES.index(obj.color)].max() > 0.5
    perfect = torch.log(torch.from_numpy(targets).clamp_min(1e-9))  # logits = log targets: the loss is the entropy
    assert alignment_loss(perfect[None], torch.from_numpy(targets)[None]) < alignment_loss(
        torch.zeros_like(perfect)[None], torch.from_numpy(targets)[None]
    )


def fit_image_from(image, width, height):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.png"
        image.save(path)
        return fit_image(path, width, height)


def test_alignment_head_trains_resumes_exactly_and_never_reaches_the_weights(data, tmp_path):
    cfg = micro_config(alignment_weight=1.0, alignment_block=1)
    run, result = _train(cfg, data, tmp_path / "straight", 8)
    plain_keys = set(NucleusTransformer(cfg.model).state_dict())
    for step_dir in sorted((tmp_path / "straight" / "checkpoints").iterdir()):
        assert set(load_file(step_dir / "model.safetensors")) == plain_keys  # no head tensor in the model file
        heads = load_file(step_dir / "heads.safetensors")
        assert {k for k in heads if k.startswith("module.")} == {f"module.{k}" for k in run.state.heads.state_dict()}
        assert any(k.startswith("optim.") for k in heads)  # the head's AdamW state resumes with it
    # The head learns: its loss on the last batch is below its loss at the start.
    assert result.losses[-1] < result.losses[0]
    # Resume from step 5 (kept checkpoints 5, 8 -> drop 8) reproduces the straight run bit for bit.
    import shutil

    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-00000008")
    resumed, again = _train(cfg, data, tmp_path / "resumed", 8, resume=True)
    assert again.losses == result.losses
    for a, b in zip(run.state.heads.parameters(), resumed.state.heads.parameters()):
        assert torch.equal(a, b)
    for (name, a), b in zip(run.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # The merged pipeline holds exactly the transformer's tensors.
    from nucleus_image.cli import main

    assert main(["merge", str(tmp_path / "straight"), "--out", str(tmp_path / "merged")]) == 0
    merged = {}
    for f in (tmp_path / "merged" / "transformer").glob("*.safetensors"):
        merged.update(load_file(f))
    assert set(merged) == plain_keys
    timing = json.loads((tmp_path / "straight" / "timing.json").read_text())
    assert {"setup", "caption encoding", "data", "forward", "backward", "optimizer"} <= set(timing["seconds"])
    assert timing["steps"] == 8 and all(v >= 0 for v in timing["seconds"].values())


def test_images_held_in_memory_give_the_same_batches(data):
    plan = BatchPlan(micro_config(alignment_weight=1.0), read_rows(data), granularity=4)
    plain = list(rank_loader(plan, 0, 1, 0, 6, num_workers=0))
    cached = RankBatches(plan, 0, 1, cache_mb=16)
    first = list(rank_loader(plan, 0, 1, 0, 6, num_workers=0, dataset=cached))
    held = cached.cached_bytes
    again = list(rank_loader(plan, 0, 1, 0, 6, num_workers=0, dataset=cached))  # served from memory
    assert held > 0 and cached.cached_bytes == held
    for a, b, c in zip(plain, first, again):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["images"], c["images"])
        assert torch.equal(a["targets"], c["targets"]) and a["captions"] == c["captions"]
    tiny = RankBatches(plan, 0, 1, cache_mb=1e-4)  # a cap below one image: nothing is held, batches unchanged
    assert torch.equal(next(iter(rank_loader(plan, 0, 1, 0, 1, 0, dataset=tiny)))["images"], plain[0]["images"])
    assert tiny.cached_bytes == 0


def test_phase_table_lists_each_command_and_its_inner_phases(tmp_path):
    from nucleus_image.timing import main, phase_table, record

    demo = tmp_path / "demo"
    (demo / "run").mkdir(parents=True)
    (demo / "eval").mkdir()
    import time

    for name, seconds in (
        ("setup", 10.0),
        ("synthesis", 20.0),
        ("training", 60.0),
        ("merge", 2.0),
        ("sampling and scoring", 8.0),
    ):
        record(demo, name, time.time_ns() - int(seconds * 1e9))
    (demo / "run" / "timing.json").write_text(
        json.dumps({"seconds": {"forward": 30.0, "backward": 20.0}, "steps": 100, "images": 6400})
    )
    (demo / "eval" / "timing.json").write_text(json.dumps({"seconds": {"sampling": 5.0, "scoring": 2.0}}))
    lines = phase_table(demo).splitlines()
    rows = {}
    for line in lines[1:-1]:
        name, seconds, share = line.rsplit(None, 2)
        rows.setdefault(name.strip(), (float(seconds), share))
    assert lines[1].startswith("setup")
    assert abs(rows["training"][0] - 60.0) < 0.5 and rows["training"][1].startswith("60.")  # 60 of 100 s
    assert rows["forward"][0] == 30.0 and rows["scoring"][0] == 2.0
    assert abs(rows["(process start, imports, rest)"][0] - 10.0) < 0.5  # training's 60 s less its parts
    assert abs(rows["total"][0] - 100.0) < 1.0
    assert "100 steps, 6400 images" in lines[-1]
    assert main(["record", str(demo), "merge"]) == 2  # no start stamp: usage, exit 2


def test_alignment_needs_object_annotations_and_says_how_to_train_without():
    from nucleus_image.training.alignment import check_annotations

    check_annotations(['{"objects": []}'])
    for bad in ([None], ['{"caption": "x"}']):
        with pytest.raises(ValueError, match="row 0 has none.*alignment_weight=0"):
            check_annotations(bad)


@pytest.mark.distributed
def test_tiny_preset_under_two_processes_trains_as_one(data, tmp_path):
    """The demo's preset (alignment head, images in memory, no data workers) runs under `--nproc 2`: the head is
    replicated (seeded alike on every rank) and its gradients averaged over the ranks, so two processes train the
    same head and model as one (up to FSDP's and gloo's rounding, see test_distributed)."""
    import os
    import subprocess

    from training_helpers import cli

    from nucleus_image.training.checkpoint import list_checkpoints, load_model_state

    shrink = [
        "stages.0.steps=2",
        "stages.1.steps=1",
        "stages.0.batch_size=4",
        "stages.1.batch_size=4",
        "optimizer.warmup_steps=1",
        "checkpoint_every=2",
        "keep_last=2",
        "sample_every=0",
        "sample_steps=2",
        "cpu_threads=1",
    ]
    env = dict(os.environ, PYTHONHASHSEED="0", OMP_NUM_THREADS="1")

    def train(out, *args):
        sets = [a for item in shrink for a in ("--set", item)]
        done = subprocess.run(
            cli("train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--no-progress", *sets, *args),
            capture_output=True,
            text=True,
            timeout=400,
            env=env,
        )
        assert done.returncode == 0, done.stderr[-4000:]

    train(tmp_path / "one")
    train(tmp_path / "two", "--nproc", "2")
    (s1, one), (s2, two) = list_checkpoints(tmp_path / "one")[-1], list_checkpoints(tmp_path / "two")[-1]
    assert s1 == s2 == 3
    losses = [json.loads((p / "trainer.json").read_text())["losses"] for p in (one, two)]
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-6, atol=0)
    # The preset's lr (6e-3, full from step 1 here) is twice the micro config's of test_distributed, and AdamW's
    # normalised update turns gloo's summation-order rounding of a near-zero gradient into up to ~1e-4 per step;
    # a head trained on one rank's half-batch instead would differ by up to 2 x lr = 1.2e-2 per step.
    a, b = load_model_state(one), load_model_state(two)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=5e-4, msg=lambda m, key=key: f"{key}: {m}")
    ha, hb = load_file(one / "heads.safetensors"), load_file(two / "heads.safetensors")
    assert set(ha) == set(hb) and any(k.startswith("module.") for k in ha)
    for key in ha:
        torch.testing.assert_close(hb[key], ha[key], rtol=0, atol=5e-4, msg=lambda m, key=key: f"{key}: {m}")
    # Without the averaging rank 0's head would follow its own half-batch and differ from the one-process head;
    # the comparison means something only if the head moved well beyond the tolerance.
    first = load_file(one / "heads.safetensors")["module.net.0.weight"]
    assert (
        first - load_file(list_checkpoints(tmp_path / "one")[0][1] / "heads.safetensors")["module.net.0.weight"]
    ).abs().max() > 1e-3  # the head moved
