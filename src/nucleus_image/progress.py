"""Progress of long work, one helper for every bar in the package: tqdm's bar when it writes to a terminal, and
plain lines otherwise (a log file, CI, a pipe), one every `interval` seconds and one at the end, so a log holds a
readable record instead of thousands of carriage-return updates.

    from nucleus_image.progress import progress

    for item in progress(items, desc="scoring", unit="img"):
        ...
    with progress(total=steps, desc="train", unit="step") as bar:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm import tqdm

# Seconds between plain lines; NUCLEUS_PROGRESS_INTERVAL changes it (0: a line at every update).
DEFAULT_INTERVAL = 30.0


def line_interval() -> float:
    value = os.environ.get("NUCLEUS_PROGRESS_INTERVAL")
    if value is None:
        return DEFAULT_INTERVAL
    try:
        return max(0.0, float(value))
    except ValueError:
        raise ValueError(f"NUCLEUS_PROGRESS_INTERVAL={value!r} is not a number of seconds") from None


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress(
    iterable: Iterable | None = None,
    *,
    total: float | None = None,
    initial: float = 0,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    leave: bool = True,
    file=None,
    **tqdm_options,
):
    """A progress bar over `iterable` or up to `total`: tqdm on a terminal, `PlainProgress` lines elsewhere. The
    same methods either way: update, set_postfix, close, iteration, `with`, and a settable `total`."""
    stream = sys.stderr if file is None else file
    if "ipykernel" in sys.modules and file is None:
        from tqdm.auto import tqdm as notebook_tqdm  # a notebook: its own widget

        return notebook_tqdm(
            iterable, total=total, initial=initial, desc=desc, unit=unit, disable=disable, leave=leave, **tqdm_options
        )
    if is_terminal(stream):
        return tqdm(
            iterable,
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            disable=disable,
            leave=leave,
            file=stream,
            dynamic_ncols=True,
            **tqdm_options,
        )
    return PlainProgress(
        iterable,
        total=total,
        initial=initial,
        desc=desc,
        unit=unit,
        disable=disable,
        leave=leave,
        file=stream,
        interval=line_interval(),
    )


class PlainProgress:
    """tqdm's statistics as whole lines: `desc: 40%| 400/1000 [02:00<03:00, 3.33step/s, loss=0.1234]`."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: float | None = None,
        initial: float = 0,
        desc: str = "",
        unit: str = "it",
        disable: bool = False,
        leave: bool = True,
        file=None,
        interval: float = DEFAULT_INTERVAL,
    ):
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.initial, self.n = iterable, total, initial, initial
        self.desc, self.unit, self.disable, self.leave = desc, unit, disable, leave
        self.file = sys.stderr if file is None else file
        self.interval = interval
        self.postfix = ""
        self.start = self.last_line = time.monotonic()
        self.printed: tuple | None = None  # (count, postfix) the last line showed

    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self.last_line >= self.interval:
            self._line(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{key}={value}" for key, value in items.items())

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self) -> None:
        """Nothing to redraw: lines are written on their interval and at the end."""

    def close(self) -> None:
        if not self.disable and self.leave and self.printed != (self.n, self.postfix):
            self._line(time.monotonic())
        self.disable = True

    def _line(self, now: float) -> None:
        text = tqdm.format_meter(
            self.n,
            self.total,
            now - self.start,
            ncols=0,
            prefix=self.desc,
            unit=self.unit,
            postfix=self.postfix or None,
            initial=self.initial,
        )
        self.file.write(text + "\n")
        self.file.flush()
        self.last_line, self.printed = now, (self.n, self.postfix)
