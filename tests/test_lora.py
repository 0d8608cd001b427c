"""LoRA with peft: a fresh or zero-scaled adapter is the base model, adapters on the stacked experts, saved adapters
reload exactly and merge, and `nucleus finetune` (plain and QLoRA) resumes bit for bit."""

import json

import pytest
import torch
from generation_fixtures import tiny_own_pipeline
from model_helpers import inputs, micro_config, randomize
from safetensors.torch import load_file
from training_helpers import legacy_layout, micro_dataset

from nucleus_image.cli import main
from nucleus_image.lora import add_lora, load_lora, set_lora_scale
from nucleus_image.model import NucleusTransformer
from nucleus_image.pipeline import NucleusPipeline

torch.set_num_threads(1)


def model_and_inputs():
    cfg = micro_config()
    return randomize(NucleusTransformer(cfg)).eval(), inputs(cfg)


def trained_adapter(model, seed=3):
    """A peft model whose B factors are random, so the adapter changes the output."""
    peft_model = add_lora(model, rank=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return peft_model.eval()


def test_fresh_or_zero_scaled_adapter_equals_the_base_and_experts_are_adapted():
    model, inp = model_and_inputs()
    with torch.no_grad():
        base = model(**inp).sample
        peft_model = add_lora(model, rank=4)
        assert torch.equal(peft_model(**inp).sample, base)  # B = 0 at init
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("experts" in n for n in names) and any("attn.to_q" in n for n in names)
    assert any("shared_expert" in n for n in names) and not any("gate" in n.split(".")[-4] for n in names)
    assert all(not p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)

    model2, _ = model_and_inputs()
    adapted = trained_adapter(model2)
    with torch.no_grad():
        assert not torch.allclose(adapted(**inp).sample, base)
        set_lora_scale(adapted, 0.0)
        assert torch.equal(adapted(**inp).sample, base)
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        add_lora(model_and_inputs()[0], rank=0)


def test_saved_adapter_reloads_identically_and_merges(tmp_path):
    model, inp = model_and_inputs()
    adapted = trained_adapter(model)
    with torch.no_grad():
        expected = adapted(**inp).sample
    adapted.save_pretrained(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    state = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("experts" in k for k in state)

    fresh, _ = model_and_inputs()
    reloaded = load_lora(fresh, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(reloaded(**inp).sample, expected)
        merged = reloaded.merge_and_unload()
        assert type(merged) is NucleusTransformer
        torch.testing.assert_close(merged(**inp).sample, expected, rtol=1e-4, atol=1e-4)
    half, _ = model_and_inputs()
    with torch.no_grad():
        base = half(**inp).sample
        mid = load_lora(half, tmp_path / "adapter", scale=0.5)(**inp).sample
    assert 0 < (mid - base).norm() < (expected - base).norm()
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        load_lora(model_and_inputs()[0], tmp_path)


@pytest.fixture(scope="module")
def pipeline_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    tiny_own_pipeline().save_pretrained(root / "model")
    data = micro_dataset(root / "data")
    # One short run encodes the captions into the session's text-state cache; the tests' runs then read them.
    assert finetune(root / "model", data, root / "captions", "--max-steps", "1") == 0
    return root / "model", data


def finetune(model, data, out, *extra):
    """`nucleus finetune` in-process."""
    return main(
        [
            "finetune",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--lora-rank",
            "4",
            "--batch-size",
            "2",
            "--steps",
            "4",
            "--checkpoint-every",
            "2",
            "--lr",
            "1e-2",
            "--no-progress",
            *extra,
        ]
    )


def test_finetune_resume_is_exact_and_adapter_loads_in_the_pipeline(pipeline_and_data, tmp_path, capsys):
    model, data = pipeline_and_data
    assert finetune(model, data, tmp_path / "straight") == 0
    capsys.readouterr()
    assert finetune(model, data, tmp_path / "split", "--max-steps", "2") == 0
    partial = capsys.readouterr().out
    assert "stopped at step 2 of 4 (--max-steps 2)" in partial and "--resume" in partial and "done" not in partial
    # The split run's config rewritten in the layout before the nested optimizer section: it still resumes.
    config = tmp_path / "split" / "finetune_config.json"
    config.write_text(json.dumps(legacy_layout(json.loads(config.read_text()))))
    assert main(["finetune", "--out", str(tmp_path / "split"), "--resume", "--no-progress"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    split = load_file(tmp_path / "split" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == split.keys() and all(torch.equal(straight[k], split[k]) for k in straight)
    losses = json.loads((tmp_path / "straight" / "losses.json").read_text())
    assert len(losses) == 4 and losses == json.loads((tmp_path / "split" / "losses.json").read_text())
    assert any(straight[k].abs().sum() > 0 for k in straight if "lora_B" in k)  # the adapter trained

    kwargs = dict(prompt="a red circle", num_inference_steps=2, output_type="latent", progress=False)
    pipe = NucleusPipeline.from_pretrained(model, device="cpu")
    base = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora(tmp_path / "straight" / "adapter")
    adapted = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert not torch.equal(adapted, base)
    merged = pipe.merge_lora()(**kwargs, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-4)
    assert finetune(model, data, tmp_path / "straight") == 2  # an existing run is not overwritten


def test_qlora_finetune_on_int8_base(pipeline_and_data, tmp_path):
    model, data = pipeline_and_data
    assert finetune(model, data, tmp_path / "q", "--quantize", "int8", "--max-steps", "2") == 0
    state = load_file(tmp_path / "q" / "adapter" / "adapter_model.safetensors")
    expert_keys = sorted(k for k in state if ".experts." in k)
    assert any(k.endswith("experts.lora_A.gate_up_proj") for k in expert_keys)
    assert any(state[k].abs().sum() > 0 for k in expert_keys if "lora_B" in k)  # the 8-bit experts' adapters trained
    kwargs = dict(prompt="a red circle", num_inference_steps=2, output_type="latent", progress=False)
    base = NucleusPipeline.from_pretrained(model, device="cpu", quantize="int8")(
        **kwargs, generator=torch.Generator().manual_seed(0)
    ).images
    pipe = NucleusPipeline.from_pretrained(model, device="cpu", quantize="int8").load_lora(tmp_path / "q" / "adapter")
    latents = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(latents).all() and not torch.equal(latents, base)
    with pytest.raises(ValueError, match="cannot merge a LoRA adapter into int8"):
        pipe.merge_lora()


def test_lora_on_quantized_experts_adds_per_expert_factors_inside_the_matmul():
    from nucleus_image.quantization import dequantize_columns, quantize_transformer

    model, inp = model_and_inputs()
    quantize_transformer(model, "int8")
    with torch.no_grad():
        base = model(**inp).sample
    adapted = trained_adapter(model)
    layer = adapted.base_model.model.transformer_blocks[1].img_mlp.experts
    assert type(layer).__name__ == "QuantizedExpertsLora"
    q = layer.get_base_layer()
    x = torch.randn(4, 5, q.gate_up_proj.shape[1])
    with torch.no_grad():
        w1 = dequantize_columns(q.gate_up_proj, q.gate_up_proj_scale, "int8", torch.float32)
        w2 = dequantize_columns(q.down_proj, q.down_proj_scale, "int8", torch.float32)
        a1, b1 = layer.lora_A["default"]["gate_up_proj"], layer.lora_B["default"]["gate_up_proj"]
        a2, b2 = layer.lora_A["default"]["down_proj"], layer.lora_B["default"]["down_proj"]
        gate, up = x.bmm(w1 + b1.bmm(a1)).chunk(2, -1)
        expected = (torch.nn.functional.silu(gate) * up).bmm(w2 + b2.bmm(a2))
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(adapted(**inp).sample, base)
        set_lora_scale(adapted, 0.0)
        assert torch.equal(adapted(**inp).sample, base)


def test_finetune_refuses_bad_input_in_one_line(pipeline_and_data, tmp_path, capsys):
    model, data = pipeline_and_data
    assert main(["finetune", "--out", str(tmp_path / "a")]) == 2
    assert "--model and --data are required" in capsys.readouterr().err
    assert finetune(model, data, tmp_path / "b", "--lora-rank", "0") == 2
    assert "lora_rank=0 must be a positive integer" in capsys.readouterr().err
    assert (
        main(["finetune", "--model", str(tmp_path / "missing"), "--data", str(data), "--out", str(tmp_path / "c")]) == 2
    )
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()
