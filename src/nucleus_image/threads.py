"""CPU threads: what `--threads N` sets on every command that computes, and the default when it is not given.

    from nucleus_image.threads import default_threads, use_threads
    use_threads(None)   # the default: every core this process may use (OMP_NUM_THREADS when set)
    use_threads(4)

What makes torch collapse on a busy machine is not the thread count but how its OpenMP threads wait: they meet at
a barrier after every parallel operation and, by default, spin there, burning the time slices the other thread
of the team needs to get to the barrier. With other processes on the cores, work made of many small operations
crawls. The `nucleus` command therefore makes waiting threads sleep (OMP_WAIT_POLICY=PASSIVE, unless the user set
OMP_WAIT_POLICY or GOMP_SPINCOUNT); then all cores are the best default, busy machine or not. Measured on a
2-core machine at load average 9-14, four images of the `tiny` model per pipeline call: torch's default (2
spinning threads) 6-45 s, 1 thread 0.6-2.2 s, 2 sleeping threads 0.15-1.2 s (docs/threads.md has the tables and
the command that measures them).
"""

from __future__ import annotations

import contextlib
import os
from contextlib import contextmanager

THREAD_ENV = "OMP_NUM_THREADS"
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SPIN_COUNT_ENV = "GOMP_SPINCOUNT"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_threads() -> tuple[int, str]:
    """The default thread count and why, e.g. (2, "2 cores")."""
    env = os.environ.get(THREAD_ENV, "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env), f"{THREAD_ENV}={env}"
    cores = available_cores()
    return cores, f"{cores} cores"


def check_threads(value: int | None, flag: str = "--threads") -> None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} {value} must be >= 1 (or leave it out for the default: every core)")


def prepare_process() -> None:
    """Before torch is imported (OpenMP reads its environment when the library loads): waiting threads sleep,
    unless the user chose how they wait (OMP_WAIT_POLICY, or GNU OpenMP's GOMP_SPINCOUNT)."""
    if WAIT_POLICY_ENV not in os.environ and SPIN_COUNT_ENV not in os.environ:
        os.environ[WAIT_POLICY_ENV] = "PASSIVE"


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op and inter-op threads, and OMP_NUM_THREADS for processes started from here (data
    workers, torchrun); `threads` None or 0 takes `default_threads()`. Returns the count."""
    import torch

    count = threads or default_threads()[0]
    torch.set_num_threads(count)
    # Settable once, before any inter-op work; a second command in one process keeps the first count.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(count)
    os.environ[THREAD_ENV] = str(count)
    return count


@contextmanager
def threads_for_command(threads: int | None):
    """`use_threads` for one command, then the thread count and environment as they were (a command run
    in-process, as the tests do, leaves the process as it found it). Yields the count."""
    import torch

    saved_env = {name: os.environ.get(name) for name in (THREAD_ENV, WAIT_POLICY_ENV)}
    saved = torch.get_num_threads()
    try:
        yield use_threads(threads)
    finally:
        torch.set_num_threads(saved)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
