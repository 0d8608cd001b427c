"""`--nproc N`: start N local processes with torchrun's own launcher (standalone rendezvous on a free port),
each running `python -m nucleus_image ARGS`; the exit status is 0 only if every process succeeded, 130 after an
interrupt."""

from __future__ import annotations

import sys


def launch(nproc: int, args: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", "--nproc-per-node", str(nproc), "-m", "nucleus_image", *args])
    except (SignalException, KeyboardInterrupt):
        # Ctrl-C / SIGTERM reached the processes too; they save at a step boundary they agree on and exit.
        return 130
    except ChildFailedError as err:
        failed = ", ".join(f"rank {rank} (exit {f.exitcode})" for rank, f in sorted(err.failures.items()))
        print(f"nucleus {args[0]}: error: {failed} failed; see the processes' output above", file=sys.stderr)
        return max(f.exitcode for f in err.failures.values()) if err.failures else 1
    return 0
