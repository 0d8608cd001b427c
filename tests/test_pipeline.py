"""NucleusPipeline against diffusers' NucleusMoEImagePipeline with tiny random components, plus its folder format,
presets, work-done-once guarantees and input refusals."""

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline
from generation_fixtures import (
    TEXT_DIM,
    tiny_diffusers_transformer,
    tiny_own_pipeline,
    tiny_qwen3vl,
    tiny_qwen_tokenizer,
    tiny_qwen_vae,
)

from nucleus_image.encoders.minilm import MiniLMTextEncoder
from nucleus_image.encoders.pixel import PixelAutoencoder
from nucleus_image.encoders.qwen3vl import Qwen3VLTextEncoder
from nucleus_image.encoders.qwen_image import QwenImageAutoencoder
from nucleus_image.model import NucleusTransformer
from nucleus_image.pipeline import ASPECT_RATIOS, NucleusPipeline, preset_sizes

SIZE = 32  # pixels; the tiny VAE is x2 and the patch 2, so 8x8 = 64 image tokens
STEPS = 4
PROMPTS = ["a red cube", "two blue spheres left of a green cone", "a red cube"]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    ref_transformer = tiny_diffusers_transformer()
    folder = tmp_path_factory.mktemp("transformer")
    ref_transformer.save_pretrained(folder)
    tokenizer = tiny_qwen_tokenizer()
    return {
        "ref_transformer": ref_transformer,
        "transformer": NucleusTransformer.from_pretrained(folder),  # ours, from the same weights
        "vae": tiny_qwen_vae(),
        "qwen": tiny_qwen3vl(len(tokenizer)),
        "tokenizer": tokenizer,
    }


def make_pipes(parts, text=False):
    ref = NucleusMoEImagePipeline(
        transformer=parts["ref_transformer"],
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=parts["vae"],
        text_encoder=parts["qwen"] if text else None,
        processor=parts["tokenizer"] if text else None,
    )
    ref.set_progress_bar_config(disable=True)
    encoder = Qwen3VLTextEncoder(parts["qwen"], parts["tokenizer"]) if text else None
    return ref, NucleusPipeline(parts["transformer"], QwenImageAutoencoder(parts["vae"]), encoder)


def embeds(batch, length, seed, pad_rows=()):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(batch, length, TEXT_DIM, generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in pad_rows:
        mask[row, length // 2 :] = 0
    return states, mask


@pytest.mark.parametrize("guidance", [1.0, 4.0], ids=["no-cfg", "cfg"])
@pytest.mark.parametrize("batch", [1, 3])
def test_parity_with_diffusers_pipeline(parts, batch, guidance):
    ref, ours = make_pipes(parts)
    # Batch 3 mixes padded and unpadded rows and different positive/negative lengths; batch 1 has no masks.
    pos, pos_mask = embeds(batch, 8, 0, pad_rows=(1,) if batch > 1 else ())
    neg, neg_mask = embeds(batch, 16, 1, pad_rows=(0, 2) if batch > 1 else ())
    latents = torch.randn(batch, (SIZE // 4) ** 2, 16, generator=torch.Generator().manual_seed(2))
    kwargs = dict(
        prompt_embeds=pos,
        prompt_embeds_mask=pos_mask,
        negative_prompt_embeds=neg,
        negative_prompt_embeds_mask=neg_mask,
        guidance_scale=guidance,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
    )
    for output_type in ("latent", "np"):
        expected = ref(**kwargs, latents=latents.clone(), output_type=output_type).images
        got = ours(**kwargs, latents=latents.clone(), output_type=output_type, progress=False).images
        assert got.shape == expected.shape
        expected = torch.as_tensor(expected)
        torch.testing.assert_close(torch.as_tensor(got), expected, atol=2e-5 * float(expected.abs().max()), rtol=0)
    initial = torch.as_tensor(ours(**kwargs, latents=latents.clone(), output_type="latent", progress=False).images)
    assert (initial - latents).abs().max() > 0.1  # the sampler moved the latents: the comparison is not vacuous


def test_same_generator_same_noise_as_diffusers(parts):
    ref, ours = make_pipes(parts)
    pos, _ = embeds(2, 8, 0)
    kwargs = dict(
        prompt_embeds=pos, guidance_scale=1.0, height=SIZE, width=SIZE, num_inference_steps=2, output_type="latent"
    )
    for generator in (
        lambda: torch.Generator().manual_seed(7),
        lambda: [torch.Generator().manual_seed(7), torch.Generator().manual_seed(8)],
    ):
        expected = ref(**kwargs, generator=generator()).images
        got = ours(**kwargs, generator=generator(), progress=False).images
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_text_prompts_parity_and_string_negative_broadcast(parts):
    ref, ours = make_pipes(parts, text=True)
    latents = torch.randn(3, (SIZE // 4) ** 2, 16, generator=torch.Generator().manual_seed(3))
    kwargs = dict(
        prompt=PROMPTS, guidance_scale=5.0, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="latent"
    )
    # The reference needs the negative spelled out per prompt (a single string crashes it); ours takes either.
    expected = ref(**kwargs, negative_prompt=["blurry"] * 3, latents=latents.clone()).images
    for negative in ("blurry", ["blurry"] * 3):
        got = ours(**kwargs, negative_prompt=negative, latents=latents.clone(), progress=False).images
        torch.testing.assert_close(got, expected, atol=2e-5 * float(expected.abs().max()), rtol=0)
    # The empty-prompt default negative, with two images per prompt.
    latents2 = torch.randn(6, (SIZE // 4) ** 2, 16, generator=torch.Generator().manual_seed(4))
    kwargs.update(num_images_per_prompt=2)
    expected = ref(**kwargs, latents=latents2.clone()).images
    got = ours(**kwargs, latents=latents2.clone(), progress=False).images
    torch.testing.assert_close(got, expected, atol=2e-5 * float(expected.abs().max()), rtol=0)


def test_work_is_done_once_per_call(parts, monkeypatch):
    _, ours = make_pipes(parts, text=True)
    calls = {"encode_unique": [], "encode_text": 0, "forward_rows": []}
    encode_unique, encode_text, forward = (
        ours.text_encoder.encode_unique,
        ours.transformer.encode_text,
        ours.transformer.forward,
    )

    def spy_unique(prompts):
        calls["encode_unique"].append(list(prompts))
        return encode_unique(prompts)

    def spy_text(*args, **kwargs):
        calls["encode_text"] += 1
        return encode_text(*args, **kwargs)

    def spy_forward(**kwargs):
        assert kwargs["text_kv"] is not None and kwargs.get("encoder_hidden_states") is None
        calls["forward_rows"].append(kwargs["hidden_states"].shape[0])
        return forward(**kwargs)

    monkeypatch.setattr(ours.text_encoder, "encode_unique", spy_unique)
    monkeypatch.setattr(ours.transformer, "encode_text", spy_text)
    monkeypatch.setattr(ours.transformer, "forward", spy_forward)
    ours(
        prompt=PROMPTS,
        negative_prompt="",
        guidance_scale=4.0,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        num_images_per_prompt=2,
        output_type="latent",
        progress=False,
    )
    # 3 prompts x 2 images + their negatives: 3 distinct texts, one encoder call, one text K/V, one CFG batch.
    assert calls["encode_unique"] == [[PROMPTS[0], PROMPTS[1], ""]]
    assert calls["encode_text"] == 1
    assert calls["forward_rows"] == [12] * STEPS
    calls["forward_rows"].clear()
    ours(
        prompt=PROMPTS,
        guidance_scale=1.0,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        output_type="latent",
        progress=False,
    )
    assert calls["forward_rows"] == [3] * STEPS  # guidance <= 1: no unconditional rows


def test_images_are_independent_of_batch_mates(parts):
    _, ours = make_pipes(parts, text=True)
    kwargs = dict(
        guidance_scale=4.0, height=SIZE, width=SIZE, num_inference_steps=STEPS, output_type="np", progress=False
    )
    together = ours(prompt=PROMPTS[:2], generator=[torch.Generator().manual_seed(s) for s in (5, 6)], **kwargs).images
    alone = ours(prompt=PROMPTS[1:2], generator=torch.Generator().manual_seed(6), **kwargs).images
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5)
    assert np.abs(together[0] - together[1]).max() > 0.01


def test_diffusers_folder_loads_and_generates_the_same(parts, tmp_path):
    ref, ours = make_pipes(parts, text=True)
    ref.save_pretrained(tmp_path / "pipe")
    loaded = NucleusPipeline.from_pretrained(tmp_path / "pipe", device="cpu")
    assert loaded.transformer.dtype == torch.float32 and loaded.sample_size == 128 * 2
    kwargs = dict(
        prompt=PROMPTS[:2],
        guidance_scale=4.0,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        output_type="pt",
        progress=False,
    )
    expected = ours(**kwargs, generator=torch.Generator().manual_seed(0)).images
    got = loaded(**kwargs, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # Our save of the same components is a folder diffusers can load back.
    loaded.save_pretrained(tmp_path / "ours")
    reloaded = NucleusMoEImagePipeline.from_pretrained(tmp_path / "ours")
    assert type(reloaded.transformer).__name__ == "NucleusMoEImageTransformer2DModel"
    bf16 = NucleusPipeline.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16, device="cpu")
    assert bf16.transformer.dtype == torch.bfloat16 and bf16.text_encoder.dtype == torch.bfloat16


def test_own_folder_round_trip_and_aspect_presets(tmp_path):
    pipe = tiny_own_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    index = json.loads((tmp_path / "model" / "model_index.json").read_text())
    assert index["_class_name"] == "NucleusPipeline"
    assert index["vae"] == ["nucleus_image", "PixelAutoencoder"]
    assert index["text_encoder"] == ["nucleus_image", "MiniLMTextEncoder"]
    loaded = NucleusPipeline.from_pretrained(tmp_path / "model", device="cpu")
    assert loaded.sample_size == 32 and loaded.granularity == 4
    kwargs = dict(
        prompt=["a red cube", "a blue sphere"],
        negative_prompt="noise",
        guidance_scale=3.0,
        aspect_ratio="16:9",
        num_inference_steps=3,
        output_type="pil",
        offload_text_encoder=True,
        progress=False,
    )
    expected = pipe(**kwargs, generator=torch.Generator().manual_seed(1)).images
    got = loaded(**kwargs, generator=torch.Generator().manual_seed(1)).images
    assert [im.size for im in got] == [pipe.aspect_size("16:9")] * 2 == [(40, 24)] * 2
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got, expected))
    # Re-saving over an existing folder replaces it.
    loaded.save_pretrained(tmp_path / "model")
    assert NucleusPipeline.from_pretrained(tmp_path / "model", device="cpu").sample_size == 32


def test_released_aspect_presets():
    sizes = preset_sizes(1024, 16)
    assert sizes == {
        "1:1": (1024, 1024),
        "16:9": (1344, 768),
        "9:16": (768, 1344),
        "4:3": (1152, 896),
        "3:4": (896, 1152),
        "3:2": (1216, 832),
        "2:3": (832, 1216),
    }
    for base, granularity in ((1024, 16), (256, 16), (64, 4), (32, 4)):
        for aspect, (w, h) in preset_sizes(base, granularity).items():
            rw, rh = map(int, aspect.split(":"))
            assert w % granularity == 0 and h % granularity == 0
            assert abs(w * h / base**2 - 1) < 0.12 and abs((w / h) / (rw / rh) - 1) < 0.12
    assert set(ASPECT_RATIOS) == set(sizes)


BAD_CALLS = [
    (dict(height=30), "height 30 is not a positive multiple of 4"),
    (dict(width=0), "width 0 is not a positive multiple of 4"),
    (dict(aspect_ratio="5:4"), "unknown aspect_ratio '5:4'; accepted: 1:1, 16:9"),
    (dict(aspect_ratio="1:1", height=32), "aspect_ratio"),
    (dict(prompt=[]), "prompt list is empty"),
    (dict(prompt=None), "exactly one of prompt and prompt_embeds"),
    (
        dict(prompt=None, prompt_embeds=torch.zeros(2, 8, TEXT_DIM), prompt_embeds_mask=torch.ones(2, 9)),
        r"prompt_embeds_mask has shape \(2, 9\); expected \(2, 8\)",
    ),
    (dict(prompt=None, prompt_embeds=torch.zeros(2, 8, 7)), rf"\(batch, tokens, {TEXT_DIM}\) tensor, got \(2, 8, 7\)"),
    (dict(negative_prompt=["x"]), "negative_prompt has 1 entries for 2 prompts"),
    (dict(negative_prompt_embeds=torch.zeros(3, 8, TEXT_DIM)), "negative_prompt_embeds has batch 3; expected 2"),
    (dict(output_type="jpeg"), "output_type 'jpeg' is not supported"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(num_inference_steps=0), "num_inference_steps must be a positive integer, got 0"),
    (dict(sigmas=[0.5, 0.9]), "non-increasing"),
    (dict(num_images_per_prompt=0), "num_images_per_prompt must be a positive integer"),
    (dict(generator=[torch.Generator()]), "got 1 generators for 2 images"),
    (dict(latents=torch.zeros(2, 10, 16)), r"latents have shape \(2, 10, 16\); expected packed \(2, 64, 16\)"),
]


@pytest.mark.parametrize("overrides, match", BAD_CALLS, ids=[m[:30] for _, m in BAD_CALLS])
def test_bad_input_is_refused_before_any_model_work(parts, monkeypatch, overrides, match):
    _, ours = make_pipes(parts, text=True)

    def forbidden(*args, **kwargs):
        raise AssertionError("model work started before the input was checked")

    monkeypatch.setattr(ours.text_encoder, "encode_unique", forbidden)
    monkeypatch.setattr(ours.transformer, "encode_text", forbidden)
    monkeypatch.setattr(ours.transformer, "forward", forbidden)
    kwargs = dict(prompt=PROMPTS[:2], height=SIZE, width=SIZE, num_inference_steps=2)
    with pytest.raises(ValueError, match=match):
        ours(**{**kwargs, **overrides})


def test_prompts_need_a_text_encoder(parts):
    _, ours = make_pipes(parts)
    with pytest.raises(ValueError, match="no text encoder"):
        ours(prompt="a cube", height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        ours(prompt_embeds=torch.zeros(1, 8, TEXT_DIM), guidance_scale=4.0, height=SIZE, width=SIZE)


def test_not_a_pipeline_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is not a pipeline folder: expected model_index.json"):
        NucleusPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "X"], "vae": [None, None]}))
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ValueError, match="lacks its vae"):
        NucleusPipeline.from_pretrained(tmp_path)


def test_mismatched_components_are_refused(parts):
    with pytest.raises(ValueError, match="joint_attention_dim is 32"):
        NucleusPipeline(parts["transformer"], QwenImageAutoencoder(parts["vae"]), MiniLMTextEncoder())
    with pytest.raises(ValueError, match="12 latent channels"):
        NucleusPipeline(parts["transformer"], PixelAutoencoder(factor=2))


def test_minilm_text_encoder_stays_fp32_when_the_pipeline_loads_in_bf16(tmp_path):
    """Training cached MiniLM's fp32 states: a bf16 load (the GPU default) keeps the encoder in fp32, so prompts
    encode to the states the model was trained on, and only the transformer runs in bf16."""
    pipe = tiny_own_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    bf16 = NucleusPipeline.from_pretrained(tmp_path / "model", dtype=torch.bfloat16, device="cpu")
    assert bf16.transformer.dtype == torch.bfloat16 and bf16.text_encoder.dtype == torch.float32
    states, _ = bf16.text_encoder.encode(["a red circle"])
    expected, _ = pipe.text_encoder.encode(["a red circle"])
    torch.testing.assert_close(states, expected)
