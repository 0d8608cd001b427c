"""Test hooks for every Python process of a test that puts this folder on PYTHONPATH (torchrun's workers
included, which a test cannot patch from outside):

    NUCLEUS_HOST_SYNC_GUARD=1   reading a tensor on the host inside `Trainer.train` raises, except where the
                                trainer reads its numbers on purpose (`host_sync.py`)
    NUCLEUS_STEP_DELAY=SECONDS  each training step sleeps this long after it ran, so a test's signal lands mid-run
"""

import os
import sys

if os.environ.get("NUCLEUS_HOST_SYNC_GUARD") == "1":
    import host_sync

    host_sync.install()
    print(f"host-sync guard: on in {sys.argv[0] or 'python'}", file=sys.stderr)

if os.environ.get("NUCLEUS_STEP_DELAY"):
    import time

    from nucleus_image.training.trainer import Trainer

    delay, step = float(os.environ["NUCLEUS_STEP_DELAY"]), Trainer._train_step

    def slow_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        time.sleep(delay)
        return out

    Trainer._train_step = slow_step
