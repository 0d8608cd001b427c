"""`nucleus distill` and the few-step student it ships: the teacher's trajectories are the pipeline's sampler, the
adapter carries its sampler settings, `load_lora` takes them as defaults (explicit arguments win), resume is exact,
a tiny distillation moves the student toward the teacher, and `generate` / `serve --lora` reproduce its images."""

import base64
import io
import json
import shlex
import shutil

import numpy as np
import pytest
import torch
from generation_fixtures import tiny_own_pipeline
from PIL import Image
from safetensors.torch import load_file
from serve_helpers import call, running_server
from training_helpers import micro_dataset

from nucleus_image.adapters import read_sampler_settings
from nucleus_image.cli import main
from nucleus_image.diffusion.sampler_settings import SamplerSettings
from nucleus_image.distill import TrajectoryPlan, TrajectoryStore
from nucleus_image.pipeline import NucleusPipeline


def distill(model, data, out, *extra):
    """`nucleus distill` in-process: a 2-step student of a 4-step teacher (guidance 4) on 16 trajectories, 16
    updates of 8 (a short warmup, so the few updates move the adapter)."""
    return main(
        [
            "distill",
            "--model",
            str(model),
            "--data",
            str(data),
            "--out",
            str(out),
            "--steps",
            "2",
            "--teacher-steps",
            "4",
            "--trajectories",
            "16",
            "--train-steps",
            "16",
            "--batch-size",
            "8",
            "--lora-rank",
            "8",
            "--lr",
            "1e-2",
            "--no-progress",
            "--set",
            "checkpoint_every=8",
            "--set",
            "teacher_batch_size=8",
            "--set",
            "optimizer.warmup_steps=2",
            "--set",
            "validation_trajectories=8",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny distillation run: (model folder, data folder, run folder)."""
    root = tmp_path_factory.mktemp("distill")
    tiny_own_pipeline().save_pretrained(root / "model")
    data = micro_dataset(root / "data")
    assert distill(root / "model", data, root / "run", "--threads", "1") == 0
    return root / "model", data, root / "run"


def test_sampler_settings_resolve_explicit_arguments_first():
    s = SamplerSettings(num_inference_steps=4, guidance_scale=1.0, sigmas=(1.0, 0.7, 0.4, 0.2))
    assert s.resolve(None, None, None) == (1.0, 4, [1.0, 0.7, 0.4, 0.2])
    assert s.resolve(None, 4, None) == (1.0, 4, [1.0, 0.7, 0.4, 0.2])  # its own step count keeps its levels
    assert s.resolve(3.0, 8, None) == (3.0, 8, None)  # another step count: the schedule's default levels
    assert s.resolve(None, None, [1.0, 0.5]) == (1.0, 2, [1.0, 0.5])
    assert SamplerSettings.from_dict(s.to_dict()) == s
    assert SamplerSettings().resolve(None, None, None) == (4.0, 50, None)  # the release's defaults
    with pytest.raises(ValueError, match="3 sigmas"):
        SamplerSettings(num_inference_steps=4, sigmas=(1.0, 0.5, 0.2))
    with pytest.raises(ValueError, match="unknown fields"):
        SamplerSettings.from_dict({"steps": 4})


def test_teacher_trajectories_are_the_pipelines_guided_sampler(run):
    model, _, folder = run
    store = TrajectoryStore(folder / "teacher")
    plan = store.plan
    assert store.states.shape == (16, 3, 64, 48) and len(store.captions) == 16
    # The teacher's 4 levels refine the student's 2 and equal the pipeline's own default 4-step grid.
    assert plan.teacher_sigmas() == [1.0, 0.75, 0.5, 0.25] and plan.student_sigmas == (1.0, 0.5)
    pipe = NucleusPipeline.from_pretrained(model, device="cpu")
    from nucleus_image.data.text_states import CaptionStates, TextStateStore, encoder_id

    text = CaptionStates(TextStateStore(encoder_id(f"pipeline:{model.resolve()}")), torch.device("cpu"))
    # The first teacher batch (8 trajectories) again: CPU matmuls sum in a batch-dependent order.
    states, mask = text.batch(store.captions[:8])
    negative, negative_mask = text.batch([""] * 8)
    seen = []
    final = pipe(
        prompt_embeds=states,
        prompt_embeds_mask=mask,
        negative_prompt_embeds=negative,
        negative_prompt_embeds_mask=negative_mask,
        guidance_scale=4.0,
        num_inference_steps=4,
        latents=store.states[:8, 0],
        output_type="latent",
        progress=False,
        callback_on_step_end=lambda p, i, t, v: seen.append(v["latents"].clone()) or v,
    ).images
    assert torch.equal(final, store.states[:8, 2]) and torch.equal(seen[1], store.states[:8, 1])
    with pytest.raises(ValueError, match="multiple of the student's steps"):
        TrajectoryPlan(
            (1.0, 0.5, 0.25),
            teacher_steps=8,
            teacher_guidance=4.0,
            height=32,
            width=32,
            trajectories=4,
            shard_size=4,
            seed=0,
        )


def test_adapter_carries_sampler_settings_and_load_lora_takes_them_as_defaults(run):
    model, _, folder = run
    adapter = folder / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert config["nucleus_sampler"] == {"num_inference_steps": 2, "guidance_scale": 1.0, "sigmas": [1.0, 0.5]}
    assert read_sampler_settings(adapter) == SamplerSettings(2, 1.0, (1.0, 0.5))

    pipe = NucleusPipeline.from_pretrained(model, device="cpu")
    rows = []
    pipe.transformer.register_forward_hook(
        lambda m, args, kwargs, out: rows.append(kwargs["hidden_states"].shape[0]), with_kwargs=True
    )
    kwargs = dict(prompt="a red circle", output_type="latent", progress=False)
    pipe.load_lora(adapter)
    assert pipe.sampler_defaults.num_inference_steps == 2
    student = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert rows == [1, 1]  # its 2 steps, one row each: no guidance
    rows.clear()
    explicit = pipe(
        **kwargs,
        num_inference_steps=2,
        guidance_scale=1.0,
        sigmas=[1.0, 0.5],
        generator=torch.Generator().manual_seed(0),
    ).images
    assert torch.equal(student, explicit) and rows == [1, 1]
    rows.clear()
    pipe(**kwargs, num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(0))
    assert rows == [2, 2, 2]  # explicit arguments win
    assert pipe.merge_lora().sampler_defaults.num_inference_steps == 2  # merged, it is still the student


def test_distill_resume_is_exact_and_refuses_to_overwrite(run, tmp_path, capsys):
    model, data, folder = run
    shutil.copytree(folder / "teacher", tmp_path / "split" / "teacher")  # the same plan: complete shards are kept
    assert distill(model, data, tmp_path / "split", "--threads", "1", "--max-steps", "8") == 0
    assert not (tmp_path / "split" / "adapter").exists()  # a partial run ships no adapter
    assert "--resume" in capsys.readouterr().out
    assert main(["distill", "--out", str(tmp_path / "split"), "--resume", "--no-progress"]) == 0
    straight = load_file(folder / "adapter" / "adapter_model.safetensors")
    split = load_file(tmp_path / "split" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == split.keys() and all(torch.equal(straight[k], split[k]) for k in straight)
    assert any(straight[k].abs().sum() > 0 for k in straight if "lora_B" in k)
    losses = json.loads((folder / "losses.json").read_text())
    assert losses == json.loads((tmp_path / "split" / "losses.json").read_text()) and len(losses) == 16
    validation = json.loads((folder / "validation.json").read_text())
    assert validation == json.loads((tmp_path / "split" / "validation.json").read_text())
    assert distill(model, data, folder) == 2  # an existing run is not overwritten
    assert "already holds a distillation run" in capsys.readouterr().err


def test_validation_trajectories_are_held_out_and_scored_at_every_checkpoint(run, capsys):
    """The validation store shares no noise or caption draw with the training store, and its loss is measured
    before training and at each checkpoint (every 8 of 16 steps): finite, per student step, falling from the
    base model's as the student learns."""
    model, data, folder = run
    train, held_out = TrajectoryStore(folder / "teacher"), TrajectoryStore(folder / "teacher-validation")
    assert len(held_out) == 8 and held_out.plan.seed != train.plan.seed
    assert held_out.plan.student_sigmas == train.plan.student_sigmas
    noise_train, noise_held = train.states[:, 0].flatten(1), held_out.states[:, 0].flatten(1)
    assert torch.cdist(noise_held, noise_train).min() > 1.0  # no starting noise in common
    validation = json.loads((folder / "validation.json").read_text())
    assert [v["step"] for v in validation] == [0, 8, 16]
    assert all(np.isfinite(v["loss"]) and len(v["per_step"]) == 2 for v in validation)
    assert np.isclose(validation[0]["loss"], np.mean(validation[0]["per_step"]))
    assert validation[-1]["loss"] < validation[0]["loss"]
    capsys.readouterr()
    assert distill(model, data, folder.parent / "bad", "--set", "validation_trajectories=-1") == 2
    assert "validation_trajectories=-1 must be >= 0" in capsys.readouterr().err
    assert distill(model, data, folder.parent / "none", "--set", "validation_trajectories=0", "--max-steps", "8") == 0
    assert not (folder.parent / "none" / "teacher-validation").exists()
    assert not (folder.parent / "none" / "validation.json").exists()


def test_distillation_moves_the_student_toward_the_teacher(run):
    """Fresh noise seeds on the distilled captions: the student's 2 steps land closer to the guided teacher's
    4-step images after 16 updates than the base model's 2 unguided steps do."""
    model, _, folder = run
    prompts = TrajectoryStore(folder / "teacher").captions[:6]
    pipe = NucleusPipeline.from_pretrained(model, device="cpu")
    kwargs = dict(prompt=prompts, output_type="latent", progress=False)
    seeds = lambda: [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]  # noqa: E731
    teacher = pipe(**kwargs, num_inference_steps=4, guidance_scale=4.0, generator=seeds()).images
    base = pipe(**kwargs, num_inference_steps=2, guidance_scale=1.0, generator=seeds()).images
    student = pipe.load_lora(folder / "adapter")(**kwargs, generator=seeds()).images
    before, after = float(((base - teacher) ** 2).mean()), float(((student - teacher) ** 2).mean())
    assert after < 0.8 * before, (before, after)


def test_generate_and_serve_with_lora_reproduce_the_students_images(run, tmp_path):
    model, _, folder = run
    adapter = folder / "adapter"
    out = tmp_path / "out"
    assert (
        main(
            [
                "generate",
                "--model",
                str(model),
                "--lora",
                str(adapter),
                "--prompt",
                "a red circle",
                "--num-images",
                "2",
                "--seed",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    sidecar = json.loads((out / "00001.json").read_text())
    assert (sidecar["num_inference_steps"], sidecar["guidance_scale"]) == (2, 1.0)  # the adapter's settings
    assert sidecar["lora"]["path"] == str(adapter.resolve()) and len(sidecar["lora"]["sha256"]) == 64
    command = shlex.split(sidecar["command"])
    assert command[command.index("--lora") + 1] == str(adapter.resolve())
    command[-1] = str(tmp_path / "again")
    assert main(command[1:]) == 0  # the sidecar's command, through the same parser as the shell's
    pixels = lambda path: np.asarray(Image.open(path))  # noqa: E731
    assert np.array_equal(pixels(out / "00001.png"), pixels(tmp_path / "again" / "00000.png"))

    with running_server(model, "--lora", str(adapter), "--max-batch", "1", startup_timeout=300) as (base, _):
        status, _, models = call(base, "/v1/models")
        assert status == 200 and models["data"][0]["defaults"]["steps"] == 2
        assert models["data"][0]["defaults"]["guidance_scale"] == 1.0
        status, _, body = call(base, "/v1/images/generations", {"prompt": "a red circle", "seed": 6})
    assert status == 200 and (body["settings"]["steps"], body["settings"]["guidance_scale"]) == (2, 1.0)
    served = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["data"][0]["b64_json"]))))
    assert np.array_equal(served, pixels(out / "00001.png"))  # seed 6 is the generate job's second image
    assert "--lora" in body["data"][0]["command"]
