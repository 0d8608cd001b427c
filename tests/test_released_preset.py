"""The `released` training preset runs given a Qwen3-VL / Qwen-Image pipeline folder (here the tiny random
components of tests/generation_fixtures.py), and its encoders are checked before the model is built."""

import dataclasses
import math

import pytest
import torch
from generation_fixtures import tiny_diffusers_transformer, tiny_qwen3vl, tiny_qwen_tokenizer, tiny_qwen_vae
from training_helpers import MICRO_MODEL, micro_dataset

import nucleus_image.training.build as build_module
from nucleus_image.training.checkpoint import list_checkpoints
from nucleus_image.training.config import StageConfig, TrainConfig
from nucleus_image.training.encoders import build_encoders
from nucleus_image.training.trainer import Trainer


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffusers import FlowMatchEulerDiscreteScheduler, NucleusMoEImagePipeline

    root = tmp_path_factory.mktemp("released")
    tokenizer = tiny_qwen_tokenizer()
    pipe = NucleusMoEImagePipeline(
        transformer=tiny_diffusers_transformer(),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=tiny_qwen_vae(),
        text_encoder=tiny_qwen3vl(len(tokenizer)),
        processor=tokenizer,
    )
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline", micro_dataset(root / "data")


def test_released_encoders_are_checked_before_the_model_is_built(folders, tmp_path, monkeypatch):
    pipeline, data = folders
    cfg = TrainConfig.preset("released")
    with pytest.raises(
        ValueError, match=r"text_encoder 'qwen3-vl' is read from a pipeline folder: pass --set pipeline_dir"
    ):
        build_encoders(cfg, torch.device("cpu"))

    def never(*args, **kwargs):
        raise AssertionError("the model was built before the encoders were checked")

    monkeypatch.setattr(build_module, "NucleusTransformer", never)
    # The tiny encoders are 32 wide, the released model wants wider text states: refused, the model never built.
    with pytest.raises(ValueError, match=r"gives 32-wide states but the model's joint_attention_dim is"):
        Trainer(cfg.override([f"pipeline_dir={pipeline}"]), data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "train_config.json").exists()


def test_released_preset_trains_from_a_qwen_pipeline_folder(folders, tmp_path):
    pipeline, data = folders
    released = TrainConfig.preset("released").override([f"pipeline_dir={pipeline}"])
    # The released recipe and encoders with a model and stage small enough for CI (same text width and latents).
    model = MICRO_MODEL.replace(joint_attention_dim=32, in_channels=16, out_channels=4, patch_size=2)
    cfg = dataclasses.replace(
        released,
        model=model,
        cpu_threads=1,
        sample_steps=2,
        sample_prompts=("a red circle",),
        stages=[StageConfig("32px", 2, 32, 2, ("1:1",), (0.0, 2.0))],
    )
    threads = torch.get_num_threads()
    try:
        result = Trainer(cfg, data, tmp_path / "run", progress=False).train()
    finally:
        torch.set_num_threads(threads)
    assert result.steps == 2 and all(math.isfinite(x) for x in result.losses)
    assert [s for s, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert (tmp_path / "run" / "samples" / "step-00000002.png").exists()
