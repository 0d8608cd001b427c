"""Bad input gets a clear error naming the value and what is accepted."""

import pytest
import torch
from model_helpers import inputs, micro_config

from nucleus_image.model import NucleusConfig, NucleusTransformer


@pytest.fixture(scope="module")
def model():
    return NucleusTransformer(micro_config()).eval()


def test_wrong_channel_count(model):
    kw = inputs(model.config)
    kw["hidden_states"] = kw["hidden_states"][..., :10]
    with pytest.raises(ValueError, match=r"hidden_states has shape \(2, 24, 10\); expected .*in_channels=16"):
        model(**kw)


def test_sequence_length_not_matching_img_shapes(model):
    kw = inputs(model.config)
    kw["img_shapes"] = [(1, 5, 5)] * 2
    with pytest.raises(ValueError, match=r"img_shapes \(1, 5, 5\) gives 25 tokens but hidden_states has 24"):
        model(**kw)


def test_mask_of_wrong_shape(model):
    kw = inputs(model.config, pad=(1, 0))
    kw["encoder_hidden_states_mask"] = kw["encoder_hidden_states_mask"][:, :5]
    with pytest.raises(ValueError, match=r"mask has shape \(2, 5\); expected \(batch, text_len\) = \(2, 7\)"):
        model(**kw)


def test_capacity_exceeding_sequence(model):
    m = NucleusTransformer(micro_config(capacity_factors=(0.0, 8.0, 2.0, 2.0)))
    with pytest.raises(ValueError, match=r"capacity factor 8.0 gives C=48 .* C must be <= 24"):
        m(**inputs(m.config))


def test_unknown_strategy_and_router_input():
    with pytest.raises(ValueError, match="unknown dense_moe_strategy 'half_dense'; accepted: leave_first_three"):
        micro_config(dense_moe_strategy="half_dense")
    with pytest.raises(ValueError, match="unknown router_input 'mixed'; accepted: decoupled, coupled"):
        micro_config(router_input="mixed")


def test_config_consistency_errors():
    with pytest.raises(ValueError, match=r"capacity_factors has 3 entries, expected num_layers=4"):
        micro_config(capacity_factors=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=r"MoE layers \[1\] have capacity factor <= 0"):
        micro_config(capacity_factors=(0.0, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads=3"):
        micro_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match="unknown model preset 'huge'; accepted: released, small, tiny"):
        NucleusConfig.preset("huge")


def test_mixed_grids_and_stale_text_kv(model):
    kw = inputs(model.config)
    with pytest.raises(ValueError, match="mixes grids"):
        model(**{**kw, "img_shapes": [(1, 4, 6), (1, 6, 4)]})
    text_kv = model.encode_text(kw["encoder_hidden_states"], None, [(1, 8, 8)])
    with pytest.raises(ValueError, match="text_kv was computed for batch 2 and text offset 4"):
        model(**{**kw, "encoder_hidden_states": None}, text_kv=text_kv)


def test_released_preset_matches_shared_config():
    import json
    from pathlib import Path

    # A copy of the released checkpoint's transformer/config.json.
    released = json.loads((Path(__file__).parent / "data" / "released_transformer_config.json").read_text())
    cfg = NucleusConfig.preset("released")
    assert NucleusConfig.from_dict(released) == cfg
    counts = cfg.param_counts()
    assert 16.8e9 < counts["total"] < 17.0e9  # 16.9B
    assert 2.0e9 < counts["active_per_token"] < 2.2e9  # ~2.1B active per token
    with torch.device("meta"):
        meta = NucleusTransformer(cfg)
    assert sum(p.numel() for p in meta.parameters()) == counts["total"]


@pytest.mark.parametrize(
    "img_shapes",
    [(4, 6), [(4, 6)] * 2, 5, [], [(1, 4.0, 6)] * 2, [(1, "4", 6)] * 2, [(1, 0, 24)] * 2, [(1, 4, 6), (1, 4)]],
)
def test_img_shapes_in_the_wrong_form(model, img_shapes):
    kw = inputs(model.config)
    kw["img_shapes"] = img_shapes
    with pytest.raises(ValueError, match=r"must be \(frames, height, width\) or a list of them, positive ints"):
        model(**kw)
