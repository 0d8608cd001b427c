"""Thread settings of the `nucleus` command against each other, on whatever load the machine has: `nucleus
generate` (4 images, end to end), `nucleus serve` (one request for 2 images, after a warm-up) and `nucleus train`
(images/s over the first steps), each run as a real process, the arms interleaved round by round so they share
the machine's conditions. Prints the median per task and arm, its ratio to the best arm, and the load average
(`/proc/loadavg`) before each run.

    python benchmarks/threads.py --model runs/demo/merged --data runs/demo/data
    python benchmarks/threads.py --model runs/demo/merged --data runs/demo/data --rounds 5 --tasks generate,serve

Arms: `default` (the command as shipped: every core, OpenMP threads sleep while they wait), `1-thread`
(--threads 1) and `spinning` (every core with GNU OpenMP's default spin-waiting, GOMP_SPINCOUNT=300000: what
torch does on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CLEAN = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")
ARMS = {
    "default": ({}, []),
    "1-thread": ({}, ["--threads", "1"]),
    "spinning": ({"GOMP_SPINCOUNT": "300000"}, ["--threads", str(len(os.sched_getaffinity(0)))]),
}
PROMPTS = ("a red circle", "two blue squares", "a green triangle left of a yellow star", "three purple circles")


def nucleus(*args: str) -> list[str]:
    return [sys.executable, "-m", "nucleus_image", *args]


def environment(extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    return {**env, "PYTHONHASHSEED": "0", **extra}


def load() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def time_generate(model: str, env: dict, flags: list[str], steps: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        prompts = [part for p in PROMPTS for part in ("--prompt", p)]
        start = time.perf_counter()
        subprocess.run(
            nucleus("generate", "--model", model, *prompts, "--steps", str(steps), "--out", out, *flags),
            env=env,
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - start


def post(base: str, body: dict) -> dict:
    request = urllib.request.Request(
        base + "/v1/images/generations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def time_serve(model: str, env: dict, flags: list[str], steps: int) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        nucleus("serve", "--model", model, "--port", str(port), "--log-level", "warning", *flags),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=2)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nucleus serve did not start (exit {server.poll()})") from None
                time.sleep(0.2)
        post(base, {"prompt": "warm-up", "n": 2, "steps": steps, "seed": 1})
        start = time.perf_counter()
        post(base, {"prompt": PROMPTS[0], "n": 2, "steps": steps, "seed": 7})
        return time.perf_counter() - start
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)


def time_train(data: str, env: dict, flags: list[str], steps: int) -> float:
    """Images per second over the run's steps, as `nucleus train` reports it (higher is better)."""
    with tempfile.TemporaryDirectory() as out:
        result = subprocess.run(
            nucleus(
                "train",
                "--preset",
                "tiny",
                "--data",
                data,
                "--out",
                out,
                "--max-steps",
                str(steps),
                "--no-progress",
                *flags,
            ),
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    return float(re.search(r"([\d.]+) images/s", result.stdout).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="pipeline folder (e.g. runs/demo/merged)")
    parser.add_argument("--data", help="dataset folder for the train task (e.g. runs/demo/data)")
    parser.add_argument("--tasks", default="generate,serve,train", help="comma-separated: generate, serve, train")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each runs every arm once per task")
    parser.add_argument("--steps", type=int, default=16, help="denoising steps (generate, serve)")
    parser.add_argument("--train-steps", type=int, default=30, help="optimizer steps (train)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    if "train" in tasks and not args.data:
        parser.error("the train task needs --data")
    arms = args.arms.split(",")
    results: dict[tuple[str, str], list[float]] = {}
    loads: list[float] = []
    for round_ in range(1, args.rounds + 1):
        for task in tasks:
            for arm in arms:
                extra, flags = ARMS[arm]
                env = environment(extra)
                loads.append(load())
                if task == "generate":
                    value = time_generate(args.model, env, flags, args.steps)
                elif task == "serve":
                    value = time_serve(args.model, env, flags, args.steps)
                else:
                    value = time_train(args.data, env, flags, args.train_steps)
                results.setdefault((task, arm), []).append(value)
                print(
                    f"round {round_} {task:8s} {arm:9s} {value:8.2f} {'images/s' if task == 'train' else 's'}"
                    f"  (load average {loads[-1]:.2f})",
                    flush=True,
                )
    print(
        f"\nload average (1 min) before the runs: {min(loads):.2f}-{max(loads):.2f} on "
        f"{len(os.sched_getaffinity(0))} cores; medians over {args.rounds} rounds"
    )
    print("| task | " + " | ".join(arms) + " |")
    print("|---|" + "---|" * len(arms))
    for task in tasks:
        medians = {arm: statistics.median(results[(task, arm)]) for arm in arms}
        higher_better = task == "train"
        best = max(medians.values()) if higher_better else min(medians.values())
        unit = "images/s" if higher_better else "s"
        cells = [f"{m:.2f} {unit} ({(best / m if higher_better else m / best):.2f}x)" for m in medians.values()]
        print(f"| {task} | " + " | ".join(cells) + " |")
    print("(Nx: how much slower than the best arm of the row)")


if __name__ == "__main__":
    main()
