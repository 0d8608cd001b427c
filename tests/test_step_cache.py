"""Step caches (First-Block-Cache, TaylorSeer): exact when disabled by their knobs, per-row state that never
leaks between batch rows or calls, sidecars that reproduce cached images, and refusals of bad settings."""

import json
import shlex

import numpy as np
import pytest
import torch
from generation_fixtures import tiny_own_pipeline
from PIL import Image

from nucleus_image.cli import main
from nucleus_image.pipeline.step_cache import FBCacheConfig, TaylorSeerConfig, cache_config, extrapolate

PROMPTS = ["a red cube", "two blue spheres left of a green cone"]
STEPS = 8
# On the tiny random model the first block's residual changes by 0.8-1.3 of itself per step, so this threshold
# skips some steps and not others, and the rows of the two prompts decide differently (asserted below).
ROW_SPLIT_THRESHOLD = 1.0


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return tiny_own_pipeline()


def generate(pipe, prompts, seeds, cache, output_type="latent"):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(
        prompt=prompts,
        generator=generators,
        num_inference_steps=STEPS,
        output_type=output_type,
        progress=False,
        cache=cache,
    )


@pytest.mark.parametrize(
    "cache",
    [FBCacheConfig(threshold=0.0), TaylorSeerConfig(order=2, interval=1)],
    ids=["fbcache-threshold-0", "taylorseer-interval-1"],
)
@pytest.mark.parametrize("guidance", [1.0, 4.0], ids=["no-cfg", "cfg"])
def test_disabled_knobs_equal_the_uncached_sampler_bitwise(pipe, cache, guidance):
    kwargs = dict(
        prompt=PROMPTS, num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent", progress=False
    )
    uncached = pipe(**kwargs, generator=torch.Generator().manual_seed(3))
    cached = pipe(**kwargs, generator=torch.Generator().manual_seed(3), cache=cache)
    assert uncached.step_cache is None
    assert torch.equal(cached.images, uncached.images)
    rows = {"conditional": STEPS, "unconditional": STEPS} if guidance > 1 else {"conditional": STEPS}
    assert [r["full_steps"] for r in cached.step_cache] == [rows] * len(PROMPTS)
    assert [r["block_work"] for r in cached.step_cache] == [1.0] * len(PROMPTS)


def test_caches_skip_the_steps_their_schedule_says(pipe):
    uncached = generate(pipe, PROMPTS, (1, 2), None).images
    taylor = generate(pipe, PROMPTS, (1, 2), TaylorSeerConfig(order=1, interval=3, warmup=2))
    # Full steps: warmup 0, 1, then every 3rd counted from the last warmup step (4, 7), and the last (7).
    assert taylor.step_cache[0]["full_steps"] == {"conditional": 4, "unconditional": 4}
    assert taylor.step_cache[0]["block_work"] == 4 / STEPS
    fb = generate(pipe, PROMPTS, (1, 2), FBCacheConfig(threshold=10.0))  # every step after the first may skip
    assert fb.step_cache[0]["full_steps"] == {"conditional": 2, "unconditional": 2}  # the first and last only
    blocks = pipe.transformer.config.num_layers
    assert fb.step_cache[0]["block_work"] == (STEPS + 2 * (blocks - 1)) / (STEPS * blocks)
    for out in (taylor.images, fb.images):  # skipping changes the result, but it stays an image of the same run
        change = (out - uncached).abs().max().item()
        assert 1e-4 < change < uncached.abs().max().item()


def test_rows_never_leak_into_each_other(pipe):
    """Each CFG row decides and caches on its own: an image generated beside another prompt equals the same
    image generated alone, although the two images' rows skip different steps. A batch-wide decision (compute
    every row when any row needs it) or shared state would break the equality."""
    cache = FBCacheConfig(threshold=ROW_SPLIT_THRESHOLD)
    together = generate(pipe, PROMPTS, (5, 6), cache, "np")
    alone = [generate(pipe, [p], [s], cache, "np") for p, s in zip(PROMPTS, (5, 6))]
    fulls = [r["full_steps"] for r in together.step_cache]
    assert fulls[0] != fulls[1], fulls
    for k in range(2):
        assert alone[k].step_cache[0] == together.step_cache[k]
        np.testing.assert_allclose(together.images[k], alone[k].images[0], atol=1e-5)


def test_state_never_leaks_between_calls(pipe):
    cache = FBCacheConfig(threshold=ROW_SPLIT_THRESHOLD)
    first = generate(pipe, PROMPTS[:1], [5], cache)
    generate(pipe, PROMPTS[1:], [6], cache)
    generate(pipe, PROMPTS[1:], [6], TaylorSeerConfig())
    again = generate(pipe, PROMPTS[:1], [5], cache)
    assert torch.equal(first.images, again.images) and first.step_cache == again.step_cache


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_extrapolation_is_exact_for_polynomials_of_its_order(order):
    g = torch.Generator().manual_seed(order)
    coeffs = torch.randn(order + 1, 3, generator=g, dtype=torch.float64)
    poly = lambda s: sum(c * s**k for k, c in enumerate(coeffs))  # noqa: E731
    steps = [0, 1, 4, 7][-(order + 1) :]  # uneven spacing, as warmup and the last step give
    got = extrapolate([(s, poly(s)) for s in steps], 9)
    torch.testing.assert_close(got, poly(9), rtol=1e-9, atol=1e-9)
    if order > 0:  # one order less cannot follow it
        assert not torch.allclose(extrapolate([(s, poly(s)) for s in steps[1:]], 9), poly(9))


@pytest.mark.parametrize(
    "policy, fields, message",
    [
        ("lru", {}, "unknown cache policy 'lru'; accepted: fbcache, taylorseer (or None)"),
        ("fbcache", {"threshold": -0.1}, "fbcache threshold must be a finite number >= 0, got -0.1"),
        ("fbcache", {"order": 2}, "cache policy 'fbcache' takes threshold, warmup; got order"),
        ("taylorseer", {"interval": 0}, "step cache interval must be an integer >= 1, got 0"),
        ("taylorseer", {"warmup": 0}, "step cache warmup must be an integer >= 1, got 0"),
    ],
)
def test_bad_settings_are_refused(policy, fields, message):
    with pytest.raises(ValueError) as err:
        cache_config(policy, **fields)
    assert str(err.value) == message


def test_pipeline_refuses_a_bad_cache_before_any_model_work(pipe, monkeypatch):
    monkeypatch.setattr(pipe.transformer, "forward", lambda **kwargs: pytest.fail("the transformer ran"))
    with pytest.raises(ValueError, match="cache must be None, one of fbcache, taylorseer or a step cache config"):
        pipe(prompt="x", cache=3, progress=False)


@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "model"
    pipe.save_pretrained(path)
    return path


def test_sidecars_report_full_steps_and_reproduce_cached_images(model_dir, tmp_path):
    out = tmp_path / "out"
    argv = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        PROMPTS[0],
        "--prompt",
        PROMPTS[1],
        "--steps",
        str(STEPS),
        "--seed",
        "5",
        "--batch-size",
        "2",
        "--cache",
        "fbcache",
        "--cache-threshold",
        str(ROW_SPLIT_THRESHOLD),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    sidecars = [json.loads((out / f"{k:05d}.json").read_text()) for k in range(2)]
    uncached = tmp_path / "uncached"
    assert main(argv[: argv.index("--cache")] + ["--out", str(uncached)]) == 0
    for k, sidecar in enumerate(sidecars):
        report = sidecar["step_cache"]
        assert (report["policy"], report["threshold"], report["steps"]) == ("fbcache", ROW_SPLIT_THRESHOLD, STEPS)
        assert 2 <= min(report["full_steps"].values()) and max(report["full_steps"].values()) < STEPS
        assert json.loads((uncached / f"{k:05d}.json").read_text())["step_cache"] is None
        command = shlex.split(sidecar["command"])
        assert command[command.index("--cache") + 1] == "fbcache"
        assert main(command[1:-1] + [str(tmp_path / f"again{k}")]) == 0
        again = tmp_path / f"again{k}" / "00000"
        image = np.asarray(Image.open(out / f"{k:05d}.png")).astype(int)
        assert np.abs(np.asarray(Image.open(again.with_suffix(".png"))).astype(int) - image).max() <= 1
        assert json.loads(again.with_suffix(".json").read_text())["step_cache"] == report
        # The cache did change the image, so reproducing it needs the cache settings the sidecar carries.
        assert not np.array_equal(np.asarray(Image.open(uncached / f"{k:05d}.png")), image)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--cache-threshold", "0.1"], "--cache-threshold needs --cache"),
        (["--cache", "taylorseer", "--cache-threshold", "0.1"], "takes interval, order, warmup; got threshold"),
        (["--cache", "taylorseer", "--cache-interval", "0"], "interval must be an integer >= 1, got 0"),
    ],
)
def test_bad_cache_flags_exit_2(model_dir, tmp_path, capsys, extra, message):
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err


def test_block_stack_seam_is_inference_only(pipe):
    model = pipe.transformer
    x = torch.randn(1, 16, model.config.in_channels)
    txt = torch.randn(1, 3, model.config.joint_attention_dim)
    kwargs = dict(hidden_states=x, img_shapes=[(1, 4, 4)], encoder_hidden_states=txt, timestep=torch.tensor([0.5]))
    stack = FBCacheConfig().build(1, 1, model.config.num_layers).block_stack(0)
    with torch.no_grad(), pytest.raises(ValueError, match="inference only"):
        model(**kwargs, block_stack=stack, return_routing=True)
    with pytest.raises(ValueError, match="inference only"):
        model(**kwargs, block_stack=stack)  # autograd on
    with torch.no_grad():  # one step, forced full: the seam computes exactly the plain loop
        assert torch.equal(model(**kwargs, block_stack=stack).sample, model(**kwargs).sample)
