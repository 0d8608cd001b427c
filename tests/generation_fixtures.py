"""Tiny, randomly initialised components for the generation tests, built locally (nothing is downloaded):
a byte-level Qwen-style tokenizer with a chat template, a Qwen3-VL, a Qwen-Image VAE and a Nucleus transformer
(diffusers' class, so the reference pipeline can run it too)."""

import torch

# Qwen's chat format for text-only messages, as the released processor's template renders it.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
TEXT_DIM = 32


def tiny_qwen_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab = {token: i for i, token in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tokenizer.padding_side = "right"
    return tokenizer


def tiny_qwen3vl(vocab_size: int, seed: int = 0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen3VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=TEXT_DIM,
            intermediate_size=64,
            num_hidden_layers=9,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=2048,
            rope_scaling={"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True},
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=TEXT_DIM,
            deepstack_visual_indexes=[0],
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=vocab_size - 2,
        video_token_id=vocab_size - 1,
    )
    return Qwen3VLForConditionalGeneration(config).eval()


def tiny_qwen_vae(seed: int = 0):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    ).eval()


def tiny_diffusers_transformer(joint_attention_dim: int = TEXT_DIM, latent_channels: int = 4, seed: int = 0):
    """3 blocks (1 dense, 2 MoE with 4 experts), GQA, weights drawn at a scale that makes every layer matter."""
    from diffusers import NucleusMoEImageTransformer2DModel

    torch.manual_seed(seed)
    model = NucleusMoEImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * latent_channels,
        out_channels=latent_channels,
        num_layers=3,
        attention_head_dim=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        joint_attention_dim=joint_attention_dim,
        axes_dims_rope=(4, 10, 10),
        moe_enabled=True,
        dense_moe_strategy="leave_first_block_dense",
        num_experts=4,
        moe_intermediate_dim=32,
        capacity_factors=[0.0, 2.0, 1.0],
        use_grouped_mm=False,
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def tiny_own_pipeline():
    """Our embedded-default stack: the `tiny` transformer preset, the pixel autoencoder and MiniLM, at 32 px."""
    from nucleus_image.encoders.minilm import MiniLMTextEncoder
    from nucleus_image.encoders.pixel import PixelAutoencoder
    from nucleus_image.model import NucleusConfig, NucleusTransformer
    from nucleus_image.pipeline import NucleusPipeline

    torch.manual_seed(0)
    transformer = NucleusTransformer(NucleusConfig.preset("tiny"))
    with torch.no_grad():  # past the adaLN-zero init, so the sampler does visible work
        for p in transformer.parameters():
            if p.ndim >= 2 and p.abs().max() == 0:
                p.normal_(0.0, 0.02)
    return NucleusPipeline(transformer.eval(), PixelAutoencoder(factor=2), MiniLMTextEncoder(), sample_size=32)
