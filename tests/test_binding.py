"""The binding loss: caption words per object, per-token object coverage, and attention logits recomputed from the
tapped queries and text keys exactly as the model's attention computes them."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from training_helpers import MICRO_MODEL, micro_config, micro_dataset

from nucleus_image.data.synthetic import SynthConfig, make_example
from nucleus_image.model import NucleusTransformer
from nucleus_image.model.rope import apply_rope
from nucleus_image.training.binding import (
    MAX_OBJECTS,
    AttentionTap,
    CaptionWords,
    binding_loss,
    binding_targets,
    caption_tokenizer,
    object_coverage,
)
from nucleus_image.training.config import TrainConfig
from nucleus_image.training.trainer import Trainer


@pytest.fixture(scope="module")
def words():
    return CaptionWords(caption_tokenizer(TrainConfig.preset("tiny")))


def test_caption_words_name_each_shape_with_its_modifiers_in_mention_order(words):
    tokens = words.tokenizer.convert_ids_to_tokens
    caption = "a picture of a red circle and three blue crosses"
    ids = words.tokenizer(caption)["input_ids"]
    slots = words.slots(caption)
    assert [s for s, _ in slots] == ["circle", "cross"]
    assert [tokens([ids[i] for i in t]) for _, t in slots] == [["red", "circle"], ["three", "blue", "crosses"]]
    caption = "An image of a star left of an orange diamond. The background is grainy white."
    assert [s for s, _ in words.slots(caption)] == ["star", "diamond"]
    # "square" as the framing is not the square object; a caption without shapes names nothing.
    framed = "A render of one shape. A large red square sits in the upper left. The picture is square, 1:1."
    ids = words.tokenizer(framed)["input_ids"]
    ((shape, t),) = words.slots(framed)
    assert shape == "square" and tokens([ids[i] for i in t]) == ["large", "red", "square"]
    assert words.slots("") == [] and words.slots("a plain picture") == []


def test_targets_cover_each_named_shapes_objects_and_its_words(words):
    scene, _, captions = make_example(0, 5, SynthConfig(size=64, task_weights={"counting": 1.0}))
    width, height, token = 32, 32, 4
    cov = object_coverage(scene.annotations(), (scene.width, scene.height), width, height, token)
    assert cov.shape == (64, MAX_OBJECTS)
    n = len(scene.objects)
    assert np.all(cov[:, n:] == 0) and all(cov[:, o].sum() > 1 for o in range(n)) and cov.sum(1).max() <= 1 + 1e-6
    shapes = [[o.shape for o in scene.objects]]
    text_len = 24
    cover, named = binding_targets(words, [captions[0]], shapes, torch.from_numpy(cov)[None], text_len)
    # A counting scene names one shape: all its objects are slot 0, the second slot is empty.
    torch.testing.assert_close(cover[0, :, 0], torch.from_numpy(cov).sum(1))
    assert cover[0, :, 1].sum() == 0 and named[0, :, 1].sum() == 0
    assert named[0, :, 0].sum() >= 1
    # Caption dropout's empty caption binds nothing.
    cover, named = binding_targets(words, [""], shapes, torch.from_numpy(cov)[None], text_len)
    assert cover.sum() == 0 and named.sum() == 0


def test_tapped_queries_and_text_keys_reproduce_the_attention(words):
    """Softmax over [image keys, tapped text keys] with the tapped queries, times the values, through the output
    projection, gives the attention module's own output; the loss is -log of the attention share on the own words."""
    torch.manual_seed(0)
    model = NucleusTransformer(MICRO_MODEL).eval()
    attn = model.transformer_blocks[1].attn
    tap = AttentionTap(attn)
    seen = {}
    attn.register_forward_hook(lambda _m, args, out: seen.update(args=args, out=out))
    B, h, w, L = 2, 4, 4, 8
    x = torch.randn(B, h * w, MICRO_MODEL.in_channels)
    text = torch.randn(B, L, MICRO_MODEL.joint_attention_dim)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.no_grad():
        model(
            hidden_states=x,
            img_shapes=[(1, h, w)] * B,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=mask,
            timestep=torch.tensor([0.3, 0.8]),
        )
        q, txt_k = tap.take()
        x_in, img_rot, _, txt_v, _ = seen["args"]
        k_img = apply_rope(attn.norm_k(attn.to_k(x_in).unflatten(-1, (attn.kv_heads, -1))).transpose(1, 2), img_rot)
        v_img = attn.to_v(x_in).unflatten(-1, (attn.kv_heads, -1)).transpose(1, 2)
        g = attn.heads // attn.kv_heads
        k = torch.cat([k_img, txt_k], 2).repeat_interleave(g, 1)
        v = torch.cat([v_img, txt_v], 2).repeat_interleave(g, 1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        full_mask = torch.cat([torch.ones(B, h * w, dtype=torch.bool), mask], 1)[:, None, None, :]
        probs = logits.masked_fill(~full_mask, float("-inf")).softmax(-1)
        out = attn.to_out[0]((probs @ v).transpose(1, 2).flatten(2))
        torch.testing.assert_close(out, seen["out"], rtol=1e-4, atol=1e-5)

        # The loss for one slot covering every image token of row 0 with words {2, 3}, nothing for row 1.
        cover = torch.zeros(B, h * w, 2)
        cover[0, :, 0] = 1.0
        named = torch.zeros(B, L, 2)
        named[0, [2, 3], 0] = 1.0
        text_probs = probs[..., h * w :]
        share = (text_probs[..., [2, 3]].sum(-1) / text_probs.sum(-1)).mean(1)  # mean over heads, (B, S)
        expected = -torch.log(share[0]).mean()
        torch.testing.assert_close(binding_loss(q, txt_k, mask, cover, named), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="has not run"):
        tap.take()


def test_binding_loss_falls_as_the_attention_moves_to_the_own_words():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 8, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 5, 8, generator=g)
    cover = torch.ones(1, 3, 1)
    named = torch.zeros(1, 5, 1)
    named[0, 1, 0] = 1.0
    opt = torch.optim.SGD([q], lr=2.0)
    first = None
    for _ in range(100):
        loss = binding_loss(q, k, None, cover, named)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    # The mean over heads of the attention on the own word: one head may carry it, as the loss allows.
    assert F.softmax((q @ k.transpose(-1, -2)) / math.sqrt(8), -1)[0, :, :, 1].mean(0).min() > 0.5


def test_trainer_adds_the_binding_term_and_saves_nothing_beside_the_model(tmp_path):
    data = micro_dataset(tmp_path / "data")
    threads = torch.get_num_threads()
    try:
        plain = Trainer(micro_config(), data, tmp_path / "plain", max_steps=1, progress=False).train().losses
        bound = Trainer(
            micro_config(binding_weight=1.0, binding_blocks=[0, 1]),
            data,
            tmp_path / "bound",
            max_steps=5,
            progress=False,
        ).train()
    finally:
        torch.set_num_threads(threads)
    # Same batch, noise and weights at step 0: the difference is the (positive) binding loss.
    assert bound.losses[0] > plain[0] + 0.1
    step_dir = next((tmp_path / "bound" / "checkpoints").iterdir())
    assert not (step_dir / "heads.safetensors").exists()
