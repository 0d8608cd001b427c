"""A fake CUDA device for the tests: run a GPU path's code on `cuda` tensors that hold no data, on a CPU build.

    with fake_cuda() as gpu:
        model = on_cuda(lambda: NucleusTransformer(cfg))          # bf16 parameters on cuda
        x = torch.randn(2, 4096, 64, device="cuda", dtype=torch.bfloat16)
        with gpu.step():
            model(hidden_states=x, ...)     # shapes, dtypes and devices are computed, no arithmetic is done

Inside the context every tensor is a FakeTensor (torch._subclasses.fake_tensor): each op computes its output's
shape, dtype and device from the op's meta rules, so the released 17B model costs nothing to build or run. What
a real GPU would refuse, the context refuses too, and makes a test failure of:

- a CPU tensor (not a 0-dim scalar) meeting a `cuda` one in an op: FakeTensorDeviceMismatchError, exactly
  torch's own device check;
- a real (non-fake) tensor made before the context, e.g. a module-level constant, entering an op;
- a host read of a device value (`.item()`, `bool(t)`, `.tolist()`, `if t:`): FakeTensors hold no values, so
  anywhere in the context (DataDependentOutputException), and inside `step()` as `HostSync`, naming the op;
- inside `step()` (the hot loop), a device-to-host copy (`.cpu()`, `.to("cpu")`, `.numpy()`) and a host-to-device
  copy (`.to("cuda")` of a CPU tensor, `torch.tensor(data, device="cuda")`: it blocks the host until the device
  gets there): `HostSync`;
- `_scaled_mm`'s operand layouts (row-major A, column-major B) and dtypes, from its meta function.

Which host reads are allowed: none, inside the context. A test puts into `step()` exactly the code that runs once
per denoising or training step (the hot loop); what runs once per call or at logging intervals (reading a loss back
every `log_every` steps, a step cache's documented per-step decision, the all-valid check of a text mask) stays
outside, and the real-tensor CPU runs of the same paths (`count_host_reads`) check that such reads are per call,
not per step.

What the context patches, each only while it is active: `torch.cuda.is_available` / `device_count` /
`current_device` / `get_device_capability` / `get_device_name` / `get_device_properties` / `is_bf16_supported`
(a device of the given compute capability, for the fp8 checks and autocast), `synchronize` and `empty_cache`
(no-ops), `torch.utils.swap_tensors` (see `_forgetting_swap`), `torch.Generator` (a `cuda` generator becomes a CPU
generator that reports device `cuda`: FakeTensors never read its state; so a CPU generator handed to a cuda
random op, which CUDA refuses, is not caught: the dispatcher sees a re-wrapped generator, not the one the context
made), and torch's device-guard registry, whose
CUDA slot a CPU build leaves empty (autograd asks it for a stream whenever a graph records a cuda leaf; torch's
own `_ensureCUDADeviceGuardSet` only swaps an existing guard for its fake one, so the slot is first given a
placeholder whose device count is 0, then torch installs `FakeGuardImpl<CUDA>`, and the slot is emptied again
on exit).

What it cannot do on a CPU build: run the autograd engine's backward over cuda tensors (the engine asks the
accelerator runtime for the current stream: "Cannot access accelerator device when none is available").
`fake_backward` stands in for `Tensor.backward` inside the context: it gives every leaf the loss depends on a
gradient of its own shape, dtype and device, which is what the optimizer step that follows reads. The backward's
own ops are torch's; the real-tensor bf16 CPU runs execute them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from unittest import mock

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

CUDA_DEVICE_TYPE = 1  # c10::DeviceType::CUDA
REAL_GENERATOR = torch.Generator
aten = torch.ops.aten


class HostSync(AssertionError):
    """A GPU path read a device value on the host or copied between host and device."""


# ---- torch's device-guard registry ---------------------------------------------------------------------------
_ZERO_DEVICES = ctypes.CFUNCTYPE(ctypes.c_int8, ctypes.c_void_p)(lambda _self: 0)
# A C++ object is a pointer to its vtable: every slot answers 0, so whatever slot deviceCount() sits in says "no
# device", which is the condition under which torch installs its FakeGuardImpl<CUDA>.
_PLACEHOLDER_VTABLE = (ctypes.c_void_p * 64)(*[ctypes.cast(_ZERO_DEVICES, ctypes.c_void_p).value] * 64)
_PLACEHOLDER = (ctypes.c_void_p * 1)(ctypes.addressof(_PLACEHOLDER_VTABLE))


def _guard_registry():
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so"))
    return (ctypes.c_void_p * (CUDA_DEVICE_TYPE + 1)).in_dll(lib, "_ZN3c104impl26device_guard_impl_registryE")


@contextlib.contextmanager
def _cuda_device_guard():
    if torch.backends.cuda.is_built():  # a CUDA build has its own guard, and maybe a real GPU
        yield
        return
    registry = _guard_registry()
    previous = registry[CUDA_DEVICE_TYPE]
    if previous is None:
        registry[CUDA_DEVICE_TYPE] = ctypes.addressof(_PLACEHOLDER)
        torch._C._ensureCUDADeviceGuardSet()
        if registry[CUDA_DEVICE_TYPE] == ctypes.addressof(_PLACEHOLDER):
            registry[CUDA_DEVICE_TYPE] = None
            raise RuntimeError("torch did not install its fake CUDA device guard; this torch cannot fake CUDA")
    try:
        yield
    finally:
        registry[CUDA_DEVICE_TYPE] = previous


# ---- generators --------------------------------------------------------------------------------------------
class _Generator(REAL_GENERATOR):
    """torch.Generator inside the context: a `cuda` one is a CPU generator reporting device `cuda`."""

    def __new__(cls, device="cpu"):
        return super().__new__(cls, "cpu" if torch.device(device).type == "cuda" else device)

    def __init__(self, device="cpu"):
        self._device = torch.device(device)
        if self._device.type == "cuda":
            self._device = torch.device("cuda", self._device.index or 0)

    @property
    def device(self):
        return self._device


# ---- host syncs --------------------------------------------------------------------------------------------
def _device_type(t) -> str | None:
    return t.device.type if isinstance(t, torch.Tensor) else None


class _DeviceDiscipline(TorchDispatchMode):
    """Sits above FakeTensorMode and refuses what the module docstring lists as host syncs."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet is aten._local_scalar_dense:
            raise HostSync(
                f"a host read of a {args[0].device} tensor (.item(), bool(), .tolist() or Python control flow on "
                f"a tensor): {func}"
            )
        if packet is aten._to_copy and "device" in kwargs and kwargs["device"] is not None:
            self._check_copy(func, _device_type(args[0]), torch.device(kwargs["device"]).type)
        elif packet is aten.copy_:
            self._check_copy(func, _device_type(args[1]), _device_type(args[0]))
        return func(*args, **kwargs)

    @staticmethod
    def _check_copy(func, src: str | None, dst: str | None) -> None:
        if src is not None and dst is not None and {src, dst} == {"cpu", "cuda"}:
            raise HostSync(f"a {src}-to-{dst} copy ({func}): it blocks the host until the device gets there")


# ---- the context -------------------------------------------------------------------------------------------
class FakeCuda:
    """What `fake_cuda()` yields: the FakeTensorMode, and `step()`, the context for the hot loop."""

    def __init__(self, mode: FakeTensorMode):
        self.mode = mode

    @contextlib.contextmanager
    def step(self):
        """Inside: host-device copies are refused too (HostSync). Setup around it (building modules, peft placing
        adapters, the data a step reads arriving on the device) may copy, as it does once on a real GPU."""
        with _DeviceDiscipline():
            yield


@contextlib.contextmanager
def fake_cuda(capability: tuple[int, int] = (9, 0), name: str = "NVIDIA H100 80GB HBM3 (fake)"):
    """Fake CUDA tensors and runtime queries for the duration (see the module docstring)."""
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    patches = [
        mock.patch.object(torch.cuda, "is_available", lambda: True),
        mock.patch.object(torch.cuda, "device_count", lambda: 1),
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
        mock.patch.object(torch.cuda, "get_device_capability", lambda device=None: capability),
        mock.patch.object(torch.cuda, "get_device_name", lambda device=None: name),
        mock.patch.object(torch.cuda, "synchronize", lambda device=None: None),
        mock.patch.object(torch.cuda, "empty_cache", lambda: None),
        mock.patch.object(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True),
        mock.patch.object(torch, "Generator", _Generator),
        mock.patch.object(torch.Tensor, "backward", fake_backward),
        mock.patch.object(torch.utils, "swap_tensors", _forgetting_swap(mode)),
    ]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_cuda_device_guard())
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(mode)
        yield FakeCuda(mode)


def _forgetting_swap(mode: FakeTensorMode):
    """torch.utils.swap_tensors for `module.to(...)` on fake parameters: `nn.Parameter(fake)` memoises the tensor
    in the mode's converter under a weak reference, and a weakly referenced tensor cannot be swapped. The memo is
    only a cache of converted tensors, so it is dropped before each swap."""
    real_swap = torch.utils.swap_tensors

    def swap(t1, t2):
        converter = mode.fake_tensor_converter
        for memo in (
            converter.tensor_memo,
            converter.meta_converter.tensor_memo,
            converter.meta_converter.storage_memo,
        ):
            memo.clear()
        return real_swap(t1, t2)

    return swap


def on_cuda(build, dtype: torch.dtype = torch.bfloat16):
    """`build()` with `cuda` as the default device and `dtype` as the default float dtype: modules made inside get
    fake cuda parameters of that dtype directly (a CPU tensor cannot be copied to a fake cuda one, and
    `module.to(...)` cannot swap a FakeTensor parameter that the fake mode holds a weak reference to)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):
            return build()
    finally:
        torch.set_default_dtype(previous)


def fake_backward(loss: torch.Tensor, gradient=None, retain_graph=None, create_graph=False, inputs=None) -> None:
    """Tensor.backward inside the context (see the module docstring): every leaf requiring grad that `loss`
    depends on gets a gradient of its shape, dtype and device, accumulated like autograd's."""
    if not isinstance(loss, FakeTensor) or loss.grad_fn is None:
        raise RuntimeError("fake_backward: the loss is not a fake tensor with a graph behind it")
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            grad = torch.empty_like(leaf, memory_format=torch.preserve_format)
            leaf.grad = grad if leaf.grad is None else leaf.grad + grad
        stack.extend(next_node for next_node, _ in node.next_functions)


# ---- host reads on real tensors ----------------------------------------------------------------------------
class count_host_reads(TorchDispatchMode):
    """Counts host reads of tensor values (`aten._local_scalar_dense`: `.item()`, `bool(t)`, `if t:`) on real
    tensors, e.g. over a bf16 CPU run. `.tolist()` and `.numpy()` of a CPU tensor read memory without dispatching,
    so they are not counted here (fake_cuda catches them)."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is aten._local_scalar_dense:
            self.reads += 1
        return func(*args, **(kwargs or {}))
