"""Tiny, randomly initialised curation models of the real classes, saved as a user's model folders would be
(save_pretrained: config.json, model.safetensors, processor and tokenizer files), built offline in a second:

- `clip_folder(path)`: CLIPModel + CLIPProcessor (a byte-level CLIPTokenizer, CLIP's PIL image processor) and an
  aesthetic_head.safetensors in the LAION improved-predictor layout (layers.0 / 2 / 4 of an nn.Sequential);
- `siglip_folder(path)`: SiglipModel + SiglipProcessor with a single-linear aesthetic head (LAION v1 layout);
- `llava_folder(path)`: LlavaForConditionalGeneration (CLIP vision tower, Llama text model) + LlavaProcessor with
  a chat template, using the byte-level tokenizer of the generation tests.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from generation_fixtures import tiny_qwen_tokenizer

from nucleus_image.data.curate import CurateConfig
from nucleus_image.data.synthetic import SynthConfig, generate_dataset

EDGES = (5.0, 5.7, 6.3, 7.0)  # tier edges spreading the tiny head's scores (about 6 +- 1)
HEAD_LAYERS = (0, 2, 4)  # nn.Sequential(Linear, Dropout, Linear, Dropout, Linear): dropouts hold no weights
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def _clip_vision(**over) -> dict:
    return (
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
        | over
    )


def clip_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {
        t: i for i, t in enumerate([*alphabet, *(a + "</w>" for a in alphabet), "<|startoftext|>", "<|endoftext|>"])
    }
    return CLIPTokenizer(vocab=vocab, merges=[])


def clip_folder(path: Path, seed: int = 0, head_scale: float = 1.0, vit_b32: bool = False) -> Path:
    """A CLIP folder whose aesthetic head gives scores around 6 +- head_scale; tiny, or with vit_b32 the layout
    of CLIP ViT-B/32 (transformers' CLIPConfig defaults, 224 px; still random, with the byte-level vocabulary)."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if vit_b32:
        config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), **ids))
        image_processor = CLIPImageProcessorPil()
    else:
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        config = CLIPConfig(
            text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=77, **text, **ids),
            vision_config=_clip_vision(),
            projection_dim=16,
        )
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPModel(config).eval().save_pretrained(path)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    widths = (config.projection_dim, 8, 4, 1)
    head = {}
    for k, (i, o) in enumerate(zip(widths[:-1], widths[1:])):
        head[f"layers.{HEAD_LAYERS[k]}.weight"] = torch.randn(o, i) / i**0.5 * (head_scale if k == 2 else 1.0)
        head[f"layers.{HEAD_LAYERS[k]}.bias"] = torch.full((o,), 6.0 if k == 2 else 0.0)
    save_file(head, str(Path(path) / "aesthetic_head.safetensors"))
    return Path(path)


def siglip_folder(path: Path, seed: int = 1) -> Path:
    """A SigLIP folder (SiglipModel + SiglipProcessor, 16 text positions) with a single-linear aesthetic head."""
    from safetensors.torch import save_file
    from transformers import SiglipConfig, SiglipImageProcessorPil, SiglipModel, SiglipProcessor

    tokenizer = clip_tokenizer()
    torch.manual_seed(seed)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = SiglipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            **ids,
        ),
        vision_config=_clip_vision(),
    )
    SiglipModel(config).eval().save_pretrained(path)
    image_processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    save_file(
        {"weight": torch.randn(1, 32), "bias": torch.tensor([6.0])}, str(Path(path) / "aesthetic_head.safetensors")
    )
    return Path(path)


def llava_folder(path: Path, seed: int = 0) -> Path:
    from transformers import CLIPImageProcessorPil, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tiny_qwen_tokenizer()
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", projection_dim=16, **_clip_vision()),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=16,
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    ).save_pretrained(path)
    return Path(path)


def synth_inputs(root: Path, num: int = 10) -> Path:
    """`nucleus data synth` images at 256 px with their captions as a Parquet input, all captions of every third
    image replaced by a file name (so the captioner has work to do)."""
    version = generate_dataset(
        root, num, seed=3, config=SynthConfig(size=256, aspect_ratios=("1:1", "4:3")), progress=False
    )
    rows = pq.read_table(version).select(["image_path", "captions"]).to_pylist()
    for i, r in enumerate(rows):
        if i % 3 == 0:
            r["captions"] = [f"IMG_{i:04d}.jpg"]
    pq.write_table(pa.Table.from_pylist(rows), root / "table.parquet")
    return root / "table.parquet"


def model_cfg(clip: Path, llava: Path, **top) -> CurateConfig:
    return CurateConfig.from_dict(
        {
            "preset": "lenient",
            "workers": 1,
            "chunk_size": 4,
            "model_batch_size": 3,
            "quality": {"model": str(clip), "tier_edges": list(EDGES)},
            # Every caption kept whatever its score, so the test can compare each generated one with the model's.
            "captions": {"model": str(clip), "synthesize_below": 0.0, "keep_above": 0.5, "similarity_range": [-1, 1]},
            "captioner": {"model": str(llava), "when": "always", "max_new_tokens": [6, 10, 14]},
            **top,
        }
    )
