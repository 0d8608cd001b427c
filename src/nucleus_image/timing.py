"""Where the time goes: wall-clock seconds per named phase, written by the commands `make demo` chains and read back
into one table at its end.

    timer = PhaseTimer()
    with timer.phase("setup"):
        ...
    timer.mark()              # in a loop: each lap() adds the time since the previous mark or lap
    batch = next_batch()
    timer.lap("data")
    timer.write(run_dir / "timing.json")

    python -m nucleus_image.timing table runs/demo                           # the demo's phase table
    python -m nucleus_image.timing record runs/demo merge "$start_ns"        # one phase, from a `date +%s%N`

`nucleus train` writes RUN/timing.json (setup, caption encoding, and its loop split into data, forward,
backward, optimizer, checkpoints and samples); `nucleus eval compositional` writes REPORT/timing.json (model load,
sampling, scoring); the Makefile appends one line per command to DEMO/phases.jsonl ({"phase", "seconds"}). The
per-phase split is host wall time: exact on the CPU; on a GPU, whose kernels run asynchronously, a phase shows
the time to launch its work, and the next blocking phase absorbs the rest.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path


class PhaseTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self) -> None:
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.add(name, now - self._last)
        self._last = now

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def write(self, path: str | Path, **extra) -> Path:
        path = Path(path)
        path.write_text(json.dumps({"seconds": self.seconds, **extra}, indent=1) + "\n")
        return path


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def phase_table(demo_dir: str | Path) -> str:
    """The demo's phases in order with seconds and share of the total, the training and scoring commands split
    into their inner phases (indented). Phases whose records are missing are left out."""
    demo_dir = Path(demo_dir)
    outer: list[tuple[str, float]] = []
    phases_file = demo_dir / "phases.jsonl"
    if phases_file.is_file():
        for line in phases_file.read_text().splitlines():
            entry = json.loads(line)
            outer.append((entry["phase"], float(entry["seconds"])))
    inner = {
        "training": _read(demo_dir / "run" / "timing.json"),
        "sampling and scoring": _read(demo_dir / "eval" / "timing.json"),
    }
    total = sum(s for _, s in outer)
    rows = [("phase", "seconds", "share")]
    for name, seconds in outer:
        rows.append((name, f"{seconds:.1f}", f"{100 * seconds / max(total, 1e-9):.1f}%"))
        parts = inner.get(name, {}).get("seconds", {})
        for part, s in parts.items():
            rows.append((f"  {part}", f"{s:.1f}", f"{100 * s / max(total, 1e-9):.1f}%"))
        if parts:
            rest = seconds - sum(parts.values())
            rows.append(("  (process start, imports, rest)", f"{rest:.1f}", f"{100 * rest / max(total, 1e-9):.1f}%"))
    rows.append(("total", f"{total:.1f}", "100%"))
    steps = inner["training"].get("steps")
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>8}  {c:>6}" for a, b, c in rows]
    if steps:
        lines.append(f"training: {steps} steps, {inner['training'].get('images', 0)} images")
    return "\n".join(lines)


def record(demo_dir: str | Path, phase: str, start_ns: int) -> None:
    """Append {"phase", "seconds"} (from `start_ns`, a `date +%s%N` stamp, to now) to DEMO/phases.jsonl."""
    seconds = (time.time_ns() - int(start_ns)) / 1e9
    path = Path(demo_dir) / "phases.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"phase": phase, "seconds": round(seconds, 3)}) + "\n")


USAGE = (
    "usage: python -m nucleus_image.timing table DEMO_DIR\n"
    "       python -m nucleus_image.timing record DEMO_DIR PHASE START_NS   (START_NS from `date +%s%N`)"
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "table":
        print(phase_table(argv[1]))
        return 0
    if len(argv) == 4 and argv[0] == "record" and argv[3].isdigit():
        record(argv[1], argv[2], int(argv[3]))
        return 0
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
