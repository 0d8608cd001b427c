"""`nucleus serve` against a real server process on 127.0.0.1 with the tiny model: valid requests, batching
that gives the same images as single requests, every limit, malformed JSON, wrong types, concurrent clients,
a full queue, batching off and a graceful shutdown."""

import base64
import io
import signal
import threading
import time

import numpy as np
import pytest
from generation_fixtures import tiny_own_pipeline
from PIL import Image
from serve_helpers import call, running_server

from nucleus_image.cli import main

pytest.importorskip("fastapi", reason="the serve extra (FastAPI, uvicorn) is not installed")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "model"
    tiny_own_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def server(model_dir):
    with running_server(
        model_dir,
        "--max-batch",
        "4",
        "--max-queue",
        "10",
        "--max-images",
        "4",
        "--max-steps",
        "60",
        "--default-steps",
        "2",
        "--max-prompt-chars",
        "100",
    ) as (base, _):
        yield base


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def generate(base, **body):
    status, _, answer = call(base, "/v1/images/generations", body)
    assert status == 200, answer
    return answer


def until(condition, timeout=120):
    """Poll `condition` (every 10 ms) until it holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        time.sleep(0.01)


def wait_job(base, job_id, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, _, answer = call(base, f"/v1/images/jobs/{job_id}")
        assert status == 200, answer
        if answer["status"] in ("done", "failed"):
            return answer
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def start_blocker(base, steps=60):
    """A running job that keeps the worker busy while the test queues others behind it."""
    status, _, job = call(base, "/v1/images/jobs", {"prompt": "busy", "steps": steps, "seed": 0})
    assert status == 202, job
    until(lambda: call(base, f"/v1/images/jobs/{job['id']}")[2]["status"] != "queued")
    return job["id"]


def test_health_models_page_and_static_files(server):
    status, _, health = call(server, "/health")
    assert status == 200 and health["status"] == "ok" and health["model"] == "model"
    models = call(server, "/v1/models")[2]["data"]
    assert [m["id"] for m in models] == ["model"]
    assert models[0]["sample_size"] == 32 and models[0]["granularity"] == 4 and models[0]["max_side"] == 64
    assert models[0]["aspect_sizes"]["16:9"] == "40x24" and models[0]["limits"]["max_images"] == 4
    status, headers, page = call(server, "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b'id="prompt"' in page
    assert all(call(server, f"/static/{name}")[0] == 200 for name in ("app.js", "style.css"))
    assert call(server, "/v1/images/jobs/nope")[0] == 404 and call(server, "/v1/images/files/nope.png")[0] == 404


def test_unknown_paths_and_methods_answer_in_the_api_error_shape(server):
    status, _, answer = call(server, "/v1/nope")
    assert status == 404 and answer == {
        "error": {"message": "no such path '/v1/nope'", "type": "invalid_request_error", "param": None}
    }
    status, headers, answer = call(server, "/v1/images/generations", method="GET")
    assert status == 405 and "POST" in headers["Allow"], answer
    assert answer["error"]["message"] == "GET is not allowed on '/v1/images/generations'" and "detail" not in answer


def test_metrics_in_prometheus_text_format_and_as_json(server):
    generate(server, prompt="counted", n=2, steps=2)
    status, headers, text = call(server, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = text.decode().splitlines()
    samples = {}
    for line in lines:
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE"), line
            continue
        name, value = line.rsplit(" ", 1)  # the exposition format: name{labels} value
        samples[name] = float(value)
    families = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert all(f"# HELP {name} " in text.decode() for name in families)
    as_json = call(server, "/metrics.json")[2]
    assert samples["nucleus_images_served_total"] == as_json["images_served"] >= 2
    assert samples['nucleus_requests_total{outcome="ok"}'] == as_json["requests"]["ok"]
    assert samples["nucleus_request_latency_seconds_count"] == as_json["requests"]["ok"]
    assert (
        samples['nucleus_request_latency_seconds{quantile="0.5"}']
        <= samples['nucleus_request_latency_seconds{quantile="0.99"}']
    )
    assert sum(v for k, v in samples.items() if k.startswith("nucleus_batches_total")) == as_json["batches"]


def test_generation_returns_pngs_settings_seeds_and_commands(server):
    answer = generate(
        server,
        prompt="a red cube",
        negative_prompt="blurry",
        n=2,
        aspect_ratio="16:9",
        steps=3,
        guidance_scale=3.0,
        seed=10,
    )
    assert answer["model"] == "model" and [d["seed"] for d in answer["data"]] == [10, 11]
    settings = answer["settings"]
    assert (settings["width"], settings["height"], settings["steps"], settings["guidance_scale"]) == (40, 24, 3, 3.0)
    assert settings["negative_prompt"] == "blurry" and settings["n"] == 2 and settings["aspect_ratio"] == "16:9"
    images = [base64.b64decode(d["b64_json"]) for d in answer["data"]]
    assert all(Image.open(io.BytesIO(png)).size == (40, 24) for png in images)
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))  # different seeds, different images
    command = answer["data"][1]["command"]
    assert command.startswith("nucleus generate --model ") and "--seed 11" in command and "--steps 3" in command
    assert "--negative blurry" in command and "--width 40 --height 24" in command and "--guidance 3.0" in command

    # The same request as URLs: the same PNGs, served by this server.
    again = generate(
        server,
        prompt="a red cube",
        negative_prompt="blurry",
        n=2,
        aspect_ratio="16:9",
        steps=3,
        guidance_scale=3.0,
        seed=10,
        response_format="url",
    )
    for item, png in zip(again["data"], images):
        assert item["url"].startswith(server + "/v1/images/files/")
        status, headers, served = call(server, item["url"].removeprefix(server))
        assert status == 200 and headers["content-type"] == "image/png" and served == png

    # Without a seed the server picks one; the images still get consecutive seeds; explicit size works.
    seeds = [d["seed"] for d in generate(server, prompt="x", n=3, size="28x36")["data"]]
    assert seeds == [seeds[0], seeds[0] + 1, seeds[0] + 2]


def test_batched_images_equal_the_same_requests_alone(server):
    requests = [
        dict(prompt="a red cube", seed=3, steps=4),
        dict(prompt="two blue circles on a long grey road", negative_prompt="dark", n=2, seed=40, steps=4),
        dict(prompt="a star", seed=7, steps=4),
    ]
    blocker = start_blocker(server)
    ids = [call(server, "/v1/images/jobs", r)[2]["id"] for r in requests]  # queued together behind the blocker
    batched = [wait_job(server, i)["result"] for i in ids]
    wait_job(server, blocker)
    assert [d["batch_size"] for b in batched for d in b["data"]] == [4, 4, 4, 4]
    for request, together in zip(requests, batched):
        for k in range(request.get("n", 1)):
            alone = generate(server, **{**request, "n": 1, "seed": request["seed"] + k})
            assert alone["data"][0]["batch_size"] == 1 and alone["data"][0]["seed"] == together["data"][k]["seed"]
            a, b = (pixels(base64.b64decode(x["data"][i]["b64_json"])) for x, i in ((alone, 0), (together, k)))
            # Per-sample routing makes the batch exact up to float summation order: at most one 8-bit level.
            assert np.abs(a - b).max() <= 1 and (a == b).mean() > 0.99


REFUSALS = [
    (b'{"prompt": "a", ', None, "not valid JSON"),
    (b"\xff\xfe", None, "not valid JSON"),
    (b'["a red cube"]', None, "must be a JSON object"),
    ({"prompt": "a", "colour": "red"}, "colour", "unknown field 'colour'"),
    ({"n": 1}, "prompt", "'prompt' is required"),
    ({"prompt": 5}, "prompt", "'prompt' must be a string, got 5"),
    ({"prompt": "   "}, "prompt", "'prompt' is empty"),
    ({"prompt": "a" * 101}, "prompt", "101 characters; at most 100"),
    ({"prompt": "a", "negative_prompt": ["x"]}, "negative_prompt", "must be a string"),
    ({"prompt": "a", "n": 0}, "n", "'n' must be in [1, 4], got 0"),
    ({"prompt": "a", "n": 5}, "n", "'n' must be in [1, 4], got 5"),
    ({"prompt": "a", "n": "2"}, "n", "'n' must be an integer in [1, 4], got \"2\""),
    ({"prompt": "a", "n": 2.0}, "n", "must be an integer"),
    ({"prompt": "a", "steps": 0}, "steps", "'steps' must be in [1, 60], got 0"),
    ({"prompt": "a", "steps": 61}, "steps", "got 61"),
    ({"prompt": "a", "steps": True}, "steps", "must be an integer"),
    ({"prompt": "a", "size": "30x32"}, "size", "multiple of 4 px"),
    ({"prompt": "a", "size": "68x32"}, "size", "between 4 and 64"),
    ({"prompt": "a", "size": "big"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "a", "size": 32}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "a", "size": "32x32", "aspect_ratio": "1:1"}, "size", "not both"),
    ({"prompt": "a", "aspect_ratio": "5:4"}, "aspect_ratio", "is not one of 1:1, 16:9"),
    ({"prompt": "a", "guidance_scale": -1}, "guidance_scale", "in [0, 20.0]"),
    ({"prompt": "a", "guidance_scale": "high"}, "guidance_scale", 'got "high"'),
    ({"prompt": "a", "seed": -1}, "seed", "'seed' must be in [0, "),
    ({"prompt": "a", "seed": 1.5}, "seed", "must be an integer"),
    ({"prompt": "a", "response_format": "png"}, "response_format", "one of b64_json, url"),
    ({"prompt": "a", "model": "dall-e-3"}, "model", "not served here"),
    (b'{"prompt": "' + b"a" * 70000 + b'"}', None, "at most 65536 are accepted"),
]


@pytest.mark.parametrize("body,param,message", REFUSALS, ids=[f"{i}-{p}" for i, (_, p, _) in enumerate(REFUSALS)])
def test_bad_requests_get_400_naming_the_field(server, body, param, message):
    for path in ("/v1/images/generations", "/v1/images/jobs"):
        status, _, answer = call(server, path, body)
        assert status == 400, answer
        assert answer["error"]["param"] == param and message in answer["error"]["message"], answer


def test_full_queue_gets_429_with_retry_after_and_the_server_recovers(server):
    blocker = start_blocker(server)
    queued = [call(server, "/v1/images/jobs", {"prompt": "q", "n": 4, "steps": 2})[2]["id"] for _ in range(2)]
    status, headers, answer = call(server, "/v1/images/generations", {"prompt": "one too many", "n": 4})
    assert status == 429 and int(headers["Retry-After"]) >= 1, answer
    assert "queue holds 8 of at most 10 images" in answer["error"]["message"]
    fits = call(server, "/v1/images/jobs", {"prompt": "fits", "n": 2, "steps": 2})
    assert fits[0] == 202
    assert all(wait_job(server, i)["status"] == "done" for i in [blocker, *queued, fits[2]["id"]])
    metrics = call(server, "/metrics.json")[2]
    assert metrics["requests"]["rejected"] >= 1 and metrics["queue_images"] == 0
    assert generate(server, prompt="after", n=1)["data"][0]["b64_json"]


def test_concurrent_clients_each_get_their_own_images(server):
    before = call(server, "/metrics.json")[2]
    answers, errors = {}, []

    def client(k):
        try:
            answers[k] = generate(server, prompt=f"client {k}", seed=1000 * k, n=1 + k % 2, steps=3)
        except AssertionError as err:
            errors.append(err)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(answers) == 6
    for k, answer in answers.items():
        assert answer["settings"]["prompt"] == f"client {k}"
        assert [d["seed"] for d in answer["data"]] == [1000 * k + i for i in range(1 + k % 2)]
    metrics = call(server, "/metrics.json")[2]
    assert metrics["images_served"] - before["images_served"] == 9
    assert max(int(size) for size in metrics["batch_sizes"]) > 1  # the clients shared pipeline calls
    assert metrics["latency_seconds"]["p50"] <= metrics["latency_seconds"]["p95"]


def test_batching_off_and_graceful_shutdown(model_dir):
    with running_server(model_dir, "--max-batch", "1", "--default-steps", "2") as (base, process):
        answer = generate(base, prompt="one at a time", n=3)
        assert [d["batch_size"] for d in answer["data"]] == [1, 1, 1]
        # SIGTERM while a request runs: the server stops listening, finishes it, then exits.
        result = {}
        thread = threading.Thread(
            target=lambda: result.update(answer=call(base, "/v1/images/generations", {"prompt": "last", "steps": 60}))
        )
        thread.start()
        until(lambda: call(base, "/metrics.json")[2]["running_images"] > 0)
        process.send_signal(signal.SIGTERM)
        thread.join(timeout=120)
        assert process.wait(timeout=60) == 0  # a drained server exits 0, as a service manager expects
        status, _, body = result["answer"]
        assert status == 200 and body["settings"]["prompt"] == "last", body
        with pytest.raises(OSError):
            call(base, "/health", timeout=2)


def test_cli_refuses_bad_arguments_in_one_line(model_dir, tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    assert main(["serve", "--model", str(model_dir), "--max-batch", "0"]) == 2
    assert main(["serve", "--model", str(model_dir), "--max-side", "30"]) == 2
    assert main(["serve", "--model", str(model_dir), "--default-guidance", "-1"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert (
        len(err) == 4
        and "--default-guidance must be in [0, 20.0], got -1.0" in err[3]
        and "is not a pipeline folder" in err[0]
        and "--max-batch must be >= 1, got 0" in err[1]
    )
    assert "--max-side 30 must be a positive multiple of 4" in err[2]
