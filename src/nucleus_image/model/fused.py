"""The model's door to the fused Triton kernels (`kernels="triton"`): `fused_ops(device)` refuses a device Triton
cannot run on, registers the kernels' custom ops on first use and returns `torch.ops.nucleus`.

The kernel modules are imported here on first use, not with the model: `@triton.jit` reads TRITON_INTERPRET when
it decorates, and a model built without kernels should not need triton at all."""

from __future__ import annotations

import torch

from nucleus_image.kernels.runtime import check_can_run


def fused_ops(device: torch.device):
    """torch.ops.nucleus, with the norm/modulation, SwiGLU and expert-dispatch ops registered."""
    if not torch.compiler.is_compiling():  # a compiled graph was traced through this check already
        check_can_run("triton", device)
    from nucleus_image.kernels import expert_dispatch, norm_modulation, swiglu  # noqa: F401  (registers the ops)

    return torch.ops.nucleus


def dispatch_plan(idx_P: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The picks sorted by token, for the expert gather/combine ops (see nucleus_image.kernels.expert_dispatch)."""
    from nucleus_image.kernels.expert_dispatch import dispatch_plan as plan

    return plan(idx_P, num_tokens)
