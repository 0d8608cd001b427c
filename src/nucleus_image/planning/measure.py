"""Peak live tensor bytes of a piece of PyTorch work, counted from the tensors its ops create.

A `TorchDispatchMode` sees every op's outputs; each new storage adds its size to the live count and a
finalizer subtracts it when the storage is freed, so `peak` is the most bytes the work held at once. On the
meta device nothing is allocated (shapes only), which is how the planner sizes a 17B model on a laptop; on CPU
the same count measures real tensors, which is how tests check the meta figures. Tensors that existed before
the mode was entered (weights) are not counted.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0
        self.peak = 0

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                self._count(storage, external=id(storage) in inputs)
        return out

    def _count(self, storage, external: bool) -> None:
        # Views and in-place results share a storage that is already counted; PyTorch keeps one Python object per
        # storage, so a mark on it (this counter's id) says so. A view of a tensor from before (a weight's
        # transpose) shares that tensor's storage: marked, never counted.
        if getattr(storage, "_nucleus_counted", None) == id(self):
            return
        storage._nucleus_counted = id(self)
        if external:
            return
        n = storage.nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, n)

    def _free(self, n: int) -> None:
        self.live -= n


@contextmanager
def peak_memory(device: torch.device):
    """Peak bytes allocated inside the block, as {"peak": n} filled on exit: the CUDA caching allocator's
    max_memory_allocated (reset on entry, relative to what was allocated then), or on the CPU the live tensor
    bytes of `LiveBytes`."""
    result = {"peak": 0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result["peak"] = torch.cuda.max_memory_allocated(device) - base
    else:
        with LiveBytes() as live:
            yield result
        result["peak"] = live.peak
