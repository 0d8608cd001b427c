"""`nucleus serve` under load: N concurrent clients on loopback, with batching on (--max-batch B) and off
(--max-batch 1), against real server processes. Prints images/s, p50/p95 request latency, the server's mean
batch size, checks that every request got its own images (nothing lost, no duplicate seeds) and the ratio
batching on / off measured in the same run.

    python benchmarks/serve.py                                      # tiny random model (the tests' fixture)
    python benchmarks/serve.py --model runs/demo/merged --steps 16  # the embedded default after `make demo`

Each client sends --requests requests one after another (a closed loop: n=1, its own seeds and prompt), so at
most --clients images are in flight; the whole run is bounded by --time-limit seconds per mode.
"""

from __future__ import annotations

import argparse
import base64
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from serve_helpers import call, running_server  # noqa: E402  (the API tests' server launcher and client)

PROMPTS = (
    "a red circle",
    "two blue squares",
    "a green triangle left of a yellow star",
    "three purple circles",
    "a small orange square above a large blue circle",
    "a grey triangle",
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def load(base: str, clients: int, requests: int, steps: int, time_limit: float) -> dict:
    latencies, seeds, failures = [], [], []
    deadline = time.monotonic() + time_limit

    def client(k: int) -> None:
        for j in range(requests):
            if time.monotonic() > deadline:
                failures.append(f"client {k}: time limit before request {j}")
                return
            seed = 1_000_000 * (k + 1) + j
            start = time.perf_counter()
            status, _, body = call(
                base,
                "/v1/images/generations",
                {"prompt": PROMPTS[(k + j) % len(PROMPTS)], "seed": seed, "steps": steps},
                timeout=max(1.0, deadline - time.monotonic()),
            )
            latencies.append(time.perf_counter() - start)
            if status != 200:
                failures.append(f"client {k} request {j}: HTTP {status} {body}")
                continue
            got = [item["seed"] for item in body["data"]]
            if got != [seed] or not base64.b64decode(body["data"][0]["b64_json"]).startswith(b"\x89PNG"):
                failures.append(f"client {k} request {j}: asked seed {seed}, got {got}")
            seeds.extend(got)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    metrics = call(base, "/metrics")[2]
    return {
        "images": len(seeds),
        "expected": clients * requests,
        "wall": wall,
        "latencies": latencies,
        "duplicate_seeds": len(seeds) - len(set(seeds)),
        "failures": failures,
        "mean_batch": metrics["mean_batch_size"],
        "batch_sizes": metrics["batch_sizes"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="pipeline folder (default: the tests' tiny random model in a temp dir)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8, help="batch size with batching on")
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help="the server's --batch-wait-ms with batching on")
    p.add_argument("--time-limit", type=float, default=300, help="seconds per mode, at most")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from generation_fixtures import tiny_own_pipeline

            model = str(Path(tmp) / "tiny-model")
            tiny_own_pipeline().save_pretrained(model)
        results = {}
        for name, max_batch, wait in (("batching on", args.max_batch, args.batch_wait_ms), ("batching off", 1, 0)):
            with running_server(
                model, "--max-batch", str(max_batch), "--max-queue", str(4 * args.clients), "--batch-wait-ms", str(wait)
            ) as (base, _):
                call(base, "/v1/images/generations", {"prompt": "warm up", "steps": args.steps})  # first-call costs
                results[name] = r = load(base, args.clients, args.requests, args.steps, args.time_limit)
            lat = r["latencies"]
            print(
                f"{name:13s} (--max-batch {max_batch}): {r['images']}/{r['expected']} images in {r['wall']:.1f} s "
                f"= {r['images'] / r['wall']:.2f} images/s; latency p50 {statistics.median(lat):.2f} s, "
                f"p95 {percentile(lat, 0.95):.2f} s; mean batch {r['mean_batch']} {r['batch_sizes']}; "
                f"duplicate seeds {r['duplicate_seeds']}; failures {len(r['failures'])}",
                flush=True,
            )
            for failure in r["failures"][:5]:
                print("   ", failure)

    on, off = results["batching on"], results["batching off"]
    ratio = (on["images"] / on["wall"]) / (off["images"] / off["wall"])
    p50 = statistics.median(off["latencies"]) / statistics.median(on["latencies"])
    print(
        f"ratio batching on / off: throughput x{ratio:.2f}, p50 latency {p50:.2f}x lower "
        f"({args.clients} clients x {args.requests} requests, {args.steps} steps, --batch-wait-ms "
        f"{args.batch_wait_ms}, model {model if args.model else 'tiny'})"
    )
    ok = all(r["images"] == r["expected"] and not r["duplicate_seeds"] and not r["failures"] for r in results.values())
    print("every request got its own image" if ok else "LOST OR WRONG IMAGES: see failures above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
