"""The server's counters and their two renderings: Prometheus' text format at GET /metrics (what a scraper
reads) and JSON at GET /metrics.json (what scripts and the tests read).

    metrics = Metrics(); metrics.record_latency(0.4); metrics.images_served += 2
    prometheus_text(scheduler.snapshot(), metrics)   # "# HELP nucleus_queue_images ...\n..."
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque

# Prometheus' text exposition format, version 0.0.4.
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
QUANTILES = (0.5, 0.95, 0.99)


class Metrics:
    """Counters: batch sizes, request latencies (quantiles over the last 1000; sum and count over all), images
    served, requests by outcome."""

    def __init__(self):
        self.started = time.time()
        self.batch_sizes: Counter[int] = Counter()
        self.batch_seconds: deque[float] = deque(maxlen=50)
        self.latencies: deque[float] = deque(maxlen=1000)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.images_served = 0
        self.requests = Counter()  # ok, failed, rejected (queue full), invalid

    def record_latency(self, seconds: float) -> None:
        self.latencies.append(seconds)
        self.latency_sum += seconds
        self.latency_count += 1

    def latency_quantile(self, q: float) -> float | None:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)] if ordered else None

    def latency_percentiles(self) -> dict[str, float | None]:
        return {
            f"p{round(q * 100)}": None if (v := self.latency_quantile(q)) is None else round(v, 4) for q in QUANTILES
        }

    def mean_batch_seconds(self) -> float:
        return sum(self.batch_seconds) / len(self.batch_seconds) if self.batch_seconds else 1.0


def prometheus_text(snapshot: dict, metrics: Metrics) -> str:
    """The snapshot's gauges and the counters in Prometheus' text format (every family with HELP and TYPE)."""
    lines: list[str] = []

    def family(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    for key, text in (
        ("queue_images", "Images waiting in the queue."),
        ("queue_requests", "Requests waiting in the queue."),
        ("running_images", "Images in the pipeline call now running."),
        ("max_batch", "Most images per pipeline call (--max-batch)."),
        ("max_queue", "Most queued images before requests get 429 (--max-queue)."),
    ):
        family(f"nucleus_{key}", "gauge", text, [("", snapshot[key])])
    family(
        "nucleus_batches_total",
        "counter",
        "Pipeline calls, by the number of images they ran.",
        [(f'{{size="{size}"}}', count) for size, count in sorted(metrics.batch_sizes.items())],
    )
    family("nucleus_images_served_total", "counter", "Images returned to clients.", [("", metrics.images_served)])
    family(
        "nucleus_requests_total",
        "counter",
        "Requests by outcome: ok, failed (500), rejected (429), invalid (400).",
        [
            (f'{{outcome="{outcome}"}}', metrics.requests.get(outcome, 0))
            for outcome in ("ok", "failed", "rejected", "invalid")
        ],
    )
    quantiles = [(f'{{quantile="{q}"}}', metrics.latency_quantile(q)) for q in QUANTILES]
    family(
        "nucleus_request_latency_seconds",
        "summary",
        "Seconds from a request's arrival to its answer (quantiles over the last 1000 requests).",
        [(labels, math.nan if v is None else v) for labels, v in quantiles]
        + [("_sum", metrics.latency_sum), ("_count", metrics.latency_count)],
    )  # suffixes of the name
    family(
        "nucleus_start_time_seconds",
        "gauge",
        "When the server started, in seconds since the epoch.",
        [("", metrics.started)],
    )
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return repr(float(value)) if isinstance(value, float) else str(int(value))
