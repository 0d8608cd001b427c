"""`nucleus generate` end to end on a tiny saved model: PNGs, JSON sidecars that reproduce each image, refusals."""

import json
import shlex
import subprocess
import sys

import numpy as np
import pytest
from generation_fixtures import tiny_own_pipeline
from PIL import Image

from nucleus_image.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("generate") / "model"
    tiny_own_pipeline().save_pretrained(path)
    return path


def pixels(path):
    return np.asarray(Image.open(path))


def test_generate_writes_images_and_sidecars_that_reproduce_them(model_dir, tmp_path):
    out = tmp_path / "out"
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text(json.dumps({"prompt": "a blue sphere", "tag": "x"}) + "\n")
    argv = [
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "a red cube",
        "--prompts",
        str(prompts_file),
        "--num-images",
        "2",
        "--steps",
        "3",
        "--guidance",
        "3.0",
        "--seed",
        "10",
        "--aspect",
        "16:9",
        "--negative",
        "noise",
        "--batch-size",
        "2",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    sidecars = [json.loads(p.with_suffix(".json").read_text()) for p in pngs]
    assert [s["prompt"] for s in sidecars] == ["a red cube", "a red cube", "a blue sphere", "a blue sphere"]
    assert [s["seed"] for s in sidecars] == [10, 11, 12, 13]
    first = sidecars[0]
    assert (first["width"], first["height"], first["aspect_ratio"]) == (40, 24, "16:9")
    assert (first["num_inference_steps"], first["guidance_scale"], first["negative_prompt"]) == (3, 3.0, "noise")
    assert len(first["sigmas"]) == 4 and first["sigmas"][-1] == 0
    assert first["model"] == str(model_dir.resolve()) and first["dtype"] == "float32" and first["batch_size"] == 2
    assert all(Image.open(p).size == (40, 24) for p in pngs)
    assert not np.array_equal(pixels(pngs[0]), pixels(pngs[1]))  # different seeds, different images

    # Same command, same images, byte for byte.
    again = tmp_path / "again"
    assert main(argv[:-1] + [str(again)]) == 0
    assert all(np.array_equal(pixels(p), pixels(again / p.name)) for p in pngs)

    # An image's sidecar command, run on its own through the installed entry point, regenerates it. Batch size 1
    # vs 2 only changes float summation order, so the pixels agree to within one level.
    command = shlex.split(sidecars[3]["command"])
    assert command[:2] == ["nucleus", "generate"]
    command[-1] = str(tmp_path / "single")
    script = "import sys; from nucleus_image.cli import main; sys.exit(main())"
    result = subprocess.run([sys.executable, "-c", script, *command[1:]], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    single = pixels(tmp_path / "single" / "00000.png").astype(int)
    assert np.abs(single - pixels(pngs[3]).astype(int)).max() <= 1
    assert json.loads((tmp_path / "single" / "00000.json").read_text())["seed"] == 13


def test_sidecar_command_regenerates_the_same_png_bytes(model_dir, tmp_path):
    """An image drawn alone (--batch-size 1, the default) comes back byte for byte, metadata included: the PNG's
    text chunks hold the settings and the command, not the file name (the command writes 00000.png)."""
    out = tmp_path / "out"
    assert (
        main(
            [
                "generate",
                "--model",
                str(model_dir),
                "--prompt",
                "a red cube",
                "--num-images",
                "2",
                "--steps",
                "2",
                "--aspect",
                "16:9",
                "--seed",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    command = shlex.split(json.loads((out / "00001.json").read_text())["command"])
    assert "--aspect" in command and "--width" not in command
    command[-1] = str(tmp_path / "again")
    assert main(command[1:]) == 0
    assert (tmp_path / "again" / "00000.png").read_bytes() == (out / "00001.png").read_bytes()


@pytest.mark.parametrize(
    "extra, message",
    [
        ([], "no prompts"),
        (["--prompt", "x", "--width", "30", "--height", "32"], "width 30 is not a positive multiple of 4"),
        (["--prompt", "x", "--aspect", "1:1", "--width", "32"], "not both"),
        (["--prompt", "x", "--steps", "0"], "--steps 0 must be >= 1"),
        (["--prompt", "x", "--width", "32"], "pass both --width and --height"),
        (["--prompts", "/nonexistent/prompts.txt"], "does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(model_dir, tmp_path, capsys, monkeypatch, extra, message):
    from nucleus_image.pipeline import NucleusPipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(NucleusPipeline, "from_pretrained", forbidden)
    assert main(["generate", "--model", str(model_dir), "--out", str(tmp_path / "o"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path).glob("o/*.png"))


def test_not_a_pipeline_folder_exits_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")]) == 2
    assert "is not a pipeline folder" in capsys.readouterr().err
