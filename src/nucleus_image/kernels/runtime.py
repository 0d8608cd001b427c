"""Where Triton kernels can run: on CUDA tensors with a working Triton, or anywhere under its interpreter."""

from __future__ import annotations

import importlib.util
import os

import torch

KERNEL_CHOICES = ("eager", "triton")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when Triton runs kernels in its Python interpreter (TRITON_INTERPRET=1): CPU tensors, no compiler."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def can_run_on(device: torch.device) -> bool:
    """Whether a Triton kernel can run on tensors of `device` in this process."""
    if not triton_installed():
        return False
    return interpreting() or device.type == "cuda"


def check_kernels_choice(kernels: str) -> None:
    """Refuse an unknown `kernels` setting, naming the value and what is accepted."""
    if kernels not in KERNEL_CHOICES:
        raise ValueError(f"kernels={kernels!r} is not one of {', '.join(KERNEL_CHOICES)}")
    if kernels == "triton" and not triton_installed():
        raise ValueError(
            "kernels='triton' needs the triton package: pip install 'nucleus-image[kernels]' "
            "(GPU builds of torch bundle it)"
        )


def check_can_run(kernels: str, device: torch.device | str) -> None:
    """Refuse kernels='triton' where Triton cannot run on `device`'s tensors, saying what would run."""
    check_kernels_choice(kernels)
    device = torch.device(device)
    if kernels == "triton" and not can_run_on(device):
        raise ValueError(
            f"kernels='triton' cannot run on device {device}: Triton kernels run on CUDA tensors, or on the CPU "
            f"under Triton's interpreter (TRITON_INTERPRET=1, slow: for tests); use kernels='eager' here"
        )
