"""A guard against host-device syncs in the training step: `Tensor.item`, `tolist`, `__float__`, `__int__`,
`__bool__`, `cpu` and `numpy` raise while `Trainer.train` runs, except inside the trainer's methods that read
numbers on purpose (`ALLOWED_IN`). On a GPU each of those calls
waits for every queued kernel; on the CPU they cost nothing, so only a guard like this one shows them.

    import host_sync; host_sync.install()      # then train; host_sync.BLOCKED lists what was refused
"""

from __future__ import annotations

import functools
import os
import threading

import torch

GUARDED = ("item", "tolist", "__float__", "__int__", "__bool__", "cpu", "numpy")
# Host work by design: logging steps, checkpoints, sample grids, entering a stage, starting the data loader (it
# seeds its workers from a CPU generator).
ALLOWED_IN = ("_log_step", "_save", "sample_grid", "_enter_stage", "_start_loader")
BLOCKED: list[str] = []
_state = threading.local()


class HostSyncError(RuntimeError):
    pass


def _depth(name: str) -> int:
    return getattr(_state, name, 0)


def _guard(name, original):
    @functools.wraps(original)
    def guarded(self, *args, **kwargs):
        if _depth("training") and not _depth("allowed") and os.getpid() == _PID:
            BLOCKED.append(name)
            raise HostSyncError(f"Tensor.{name} in a training step outside a logging step: a host-device sync")
        return original(self, *args, **kwargs)

    return guarded


def _window(attribute, original):
    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        setattr(_state, attribute, _depth(attribute) + 1)
        try:
            return original(*args, **kwargs)
        finally:
            setattr(_state, attribute, _depth(attribute) - 1)

    return wrapped


_PID = os.getpid()


def install(patch=setattr) -> None:
    """Guard the tensor methods and open the windows; `patch` is how attributes are set (pytest's
    monkeypatch.setattr undoes them after the test)."""
    global _PID
    from nucleus_image.training.trainer import Trainer

    _PID = os.getpid()
    for name in GUARDED:
        patch(torch.Tensor, name, _guard(name, getattr(torch.Tensor, name)))
    patch(Trainer, "train", _window("training", Trainer.train))
    for name in ALLOWED_IN:
        patch(Trainer, name, _window("allowed", getattr(Trainer, name)))
