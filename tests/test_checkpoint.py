"""The diffusers checkpoint format both ways, sharding, meta-device loading and error reporting."""

import json

import pytest
import torch
from model_helpers import inputs, micro_config, randomize, reference_twin, rel_err
from safetensors.torch import load_file, save_file

from nucleus_image.model import NucleusTransformer
from nucleus_image.model.checkpoint import INDEX_NAME, WEIGHTS_NAME


@pytest.fixture(scope="module")
def model():
    return randomize(NucleusTransformer(micro_config(use_grouped_mm=False))).eval()


def test_ours_to_diffusers(model, tmp_path):
    from diffusers import NucleusMoEImageTransformer2DModel

    model.save_pretrained(tmp_path / "m")
    ref = NucleusMoEImageTransformer2DModel.from_pretrained(tmp_path / "m").eval()
    kw = inputs(model.config, pad=(0, 3))
    with torch.no_grad():
        assert torch.equal(ref(**kw, return_dict=False)[0], reference_twin(model)(**kw, return_dict=False)[0])
        assert rel_err(model(**kw).sample, ref(**kw, return_dict=False)[0]) <= 1e-5


def test_diffusers_to_ours_sharded(model, tmp_path):
    ref = reference_twin(model)
    ref.save_pretrained(tmp_path / "d", max_shard_size="20KB")
    assert (tmp_path / "d" / "diffusion_pytorch_model.safetensors.index.json").exists()
    ours = NucleusTransformer.from_pretrained(tmp_path / "d", dtype=torch.float32)
    kw = inputs(model.config)
    with torch.no_grad():
        assert rel_err(ours(**kw).sample, ref(**kw, return_dict=False)[0]) <= 1e-5
    for k, v in model.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k


def test_our_sharding_round_trip_and_dtype(model, tmp_path):
    model.save_pretrained(tmp_path / "s", max_shard_size=30_000)
    index = json.loads((tmp_path / "s" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(model.state_dict())
    loaded = NucleusTransformer.from_pretrained(tmp_path / "s", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.is_meta for p in loaded.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.to(torch.bfloat16)), k
    # Saving over an existing model replaces it whole, leaving no temporary folders behind.
    model.save_pretrained(tmp_path / "s")
    assert not (tmp_path / "s" / INDEX_NAME).exists() and (tmp_path / "s" / WEIGHTS_NAME).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_pipeline_folder_resolves_transformer_subfolder(model, tmp_path):
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    loaded = NucleusTransformer.from_pretrained(tmp_path / "pipe")
    assert torch.equal(loaded.proj_out.weight, model.proj_out.weight)


def test_bad_checkpoints_list_every_problem(model, tmp_path):
    model.save_pretrained(tmp_path / "b")
    file = tmp_path / "b" / WEIGHTS_NAME
    state = load_file(str(file))
    state.pop("proj_out.weight")
    state["extra.weight"] = torch.zeros(2)
    state["img_in.weight"] = torch.zeros(3, 3)
    save_file(state, str(file))
    with pytest.raises(ValueError) as err:
        NucleusTransformer.from_pretrained(tmp_path / "b")
    msg = str(err.value)
    assert "1 missing: proj_out.weight" in msg
    assert "1 unexpected: extra.weight" in msg
    assert "img_in.weight: checkpoint (3, 3) vs model (64, 16)" in msg


def test_not_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        NucleusTransformer.from_pretrained(tmp_path)
