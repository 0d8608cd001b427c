"""Warmup-Stable-Merge: the merge coefficients, the decay they imply, exactness on identical checkpoints, and
`nucleus merge` on a real run writing a pipeline folder that loads."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import micro_config, micro_dataset

from nucleus_image.cli import main
from nucleus_image.training.checkpoint import list_checkpoints
from nucleus_image.training.merge import decay_weights, merge_coefficients, merge_state_dicts


def test_coefficients():
    assert merge_coefficients(4, "uniform") == pytest.approx([0.25] * 4)
    c = merge_coefficients(4, "inverse-sqrt")
    raw = [1 / math.sqrt(4), 1 / math.sqrt(3), 1 / math.sqrt(2), 1.0]  # oldest (age 4) .. newest (age 1)
    assert c == pytest.approx([r / sum(raw) for r in raw])
    assert sum(c) == pytest.approx(1.0) and all(b > a for a, b in zip(c, c[1:]))
    assert merge_coefficients(1, "inverse-sqrt") == [1.0]
    assert decay_weights(merge_coefficients(4, "uniform")) == pytest.approx([0.75, 0.5, 0.25])
    w = decay_weights(c)
    assert all(1 >= a >= b > 0 for a, b in zip(w, w[1:]))
    with pytest.raises(ValueError, match="accepted: inverse-sqrt, uniform"):
        merge_coefficients(3, "ema")


@pytest.mark.parametrize("kind", ["uniform", "inverse-sqrt"])
def test_merge_equals_decayed_updates(kind):
    gen = torch.Generator().manual_seed(0)
    theta0 = torch.randn(6, 5, dtype=torch.float64, generator=gen)
    updates = [torch.randn(6, 5, dtype=torch.float64, generator=gen) for _ in range(4)]  # Delta_1..Delta_4
    thetas = [theta0]
    for delta in updates:
        thetas.append(thetas[-1] - delta)
    c = merge_coefficients(5, kind)
    merged = merge_state_dicts([{"w": t} for t in thetas], c)["w"]
    replay = theta0 - sum(w_i * d for w_i, d in zip(decay_weights(c), updates))
    assert torch.allclose(merged, replay, atol=1e-12)


def test_merging_copies_returns_the_model():
    sd = {"a": torch.randn(7, 3), "b": torch.randn(11).to(torch.bfloat16), "steps": torch.tensor([3])}
    for kind in ("uniform", "inverse-sqrt"):
        merged = merge_state_dicts([sd] * 5, merge_coefficients(5, kind))
        assert all(torch.equal(merged[k], sd[k]) and merged[k].dtype == sd[k].dtype for k in sd)


def test_mismatched_checkpoints_are_refused():
    with pytest.raises(ValueError, match="different tensors"):
        merge_state_dicts([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [0.5, 0.5])


def test_nucleus_merge_writes_a_loadable_pipeline(tmp_path):
    from nucleus_image.pipeline import NucleusPipeline
    from nucleus_image.training.trainer import Trainer

    data = micro_dataset(tmp_path / "data")
    run = tmp_path / "run"
    threads = torch.get_num_threads()
    try:
        Trainer(micro_config(), data, run, max_steps=12, progress=False).train()
    finally:
        torch.set_num_threads(threads)
    assert [s for s, _ in list_checkpoints(run)] == [5, 10, 12]  # keep_last=3 of every 5 steps + the final one
    assert main(["merge", str(run), "--last", "3", "--weights", "inverse-sqrt", "--out", str(tmp_path / "merged")]) == 0

    expected = merge_state_dicts(
        [load_file(p / "model.safetensors") for _, p in list_checkpoints(run)], merge_coefficients(3, "inverse-sqrt")
    )
    pipe = NucleusPipeline.from_pretrained(tmp_path / "merged", device="cpu")
    got = pipe.transformer.state_dict()
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    image = pipe(
        ["a red circle"],
        num_inference_steps=2,
        guidance_scale=2.0,
        progress=False,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    # Stopped at step 12, inside the 16 px stage: that stage's resolution is the native size, not the last one's.
    assert image.size == (16, 16) and json.loads((tmp_path / "merged" / "merge.json").read_text())["resolution"] == 16

    threads = torch.get_num_threads()
    try:  # on into the 24 px stage (steps 20..29): a window over steps 15, 20, 24 crosses the boundary
        Trainer(micro_config(), data, run, max_steps=24, resume=True, progress=False).train()
    finally:
        torch.set_num_threads(threads)
    with pytest.warns(UserWarning, match=r"crosses a stage boundary \(16px -> 24px\)"):
        assert main(["merge", str(run), "--last", "3", "--out", str(tmp_path / "late")]) == 0
    assert json.loads((tmp_path / "late" / "merge.json").read_text())["resolution"] == 24
    with pytest.raises(SystemExit):  # argparse refuses an unknown weighting
        main(["merge", str(run), "--weights", "ema", "--out", str(tmp_path / "x")])
    assert main(["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
