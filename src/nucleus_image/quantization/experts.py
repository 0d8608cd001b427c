"""8-bit stacked experts: int8 or float8_e4m3fn storage with one scale per expert and output column.

torchao quantizes `nn.Linear` weights, but the experts hold (E, in, out) tensors consumed by `torch.bmm`, which its
tensor subclasses do not implement (DESIGN-distributed.md section 5). Here each expert's weight is scaled per output
column, w[e, :, o] ~= q[e, :, o] * scale[e, 0, o], so the scale commutes with the matmul:

    bmm(x, w) ~= bmm(x, q.to(x.dtype)) * scale

The cast of q is exact (int8 and e4m3 values are representable in bf16), and only one layer's weight exists in
the compute dtype at a time, transiently. Float8 codes are stored as uint8 bytes so that `module.to(dtype)` (which
casts every floating tensor) cannot silently turn them into bf16 copies.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nucleus_image.model.moe import SwiGLUExperts

METHODS = ("int8", "fp8")
_QMAX = {"int8": 127.0, "fp8": torch.finfo(torch.float8_e4m3fn).max}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"quantization method {method!r} is not supported; accepted: {', '.join(METHODS)}")
    return method


def quantize_columns(w_EIO: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scale_E1O): int8 codes, or float8_e4m3fn codes viewed as uint8, and float32 per-column scales."""
    check_method(method)
    w = w_EIO.float()
    amax_E1O = w.abs().amax(dim=-2, keepdim=True)
    scale_E1O = torch.where(amax_E1O > 0, amax_E1O / _QMAX[method], torch.ones_like(amax_E1O))
    if method == "int8":
        codes = torch.round(w / scale_E1O).clamp_(-128, 127).to(torch.int8)
    else:
        # Clamped: the quotient can round just past the e4m3 maximum, and the cast need not saturate.
        codes = (w / scale_E1O).clamp_(-_QMAX["fp8"], _QMAX["fp8"]).to(torch.float8_e4m3fn).view(torch.uint8)
    return codes, scale_E1O


def dequantize_columns(codes: torch.Tensor, scale_E1O: torch.Tensor, method: str, dtype: torch.dtype) -> torch.Tensor:
    """The weight the codes stand for, in `dtype` (the reference the quantized matmul is tested against)."""
    return (_codes_as_float(codes, method, torch.float32) * scale_E1O.float()).to(dtype)


def _codes_as_float(codes: torch.Tensor, method: str, dtype: torch.dtype) -> torch.Tensor:
    if method == "fp8":
        codes = codes.view(torch.float8_e4m3fn)
    return codes.to(dtype)


class QuantizedSwiGLUExperts(nn.Module):
    """Drop-in for SwiGLUExperts with 8-bit weights: gate_up_proj (E, D, 2F) and down_proj (E, F, D) codes, plus
    gate_up_proj_scale (E, 1, 2F) and down_proj_scale (E, 1, D). Inference only: the codes take no gradient."""

    def __init__(self, dim: int, inner: int, num_experts: int, method: str):
        super().__init__()
        self.method = check_method(method)
        code_dtype = torch.int8 if method == "int8" else torch.uint8
        self.register_buffer("gate_up_proj", torch.empty(num_experts, dim, 2 * inner, dtype=code_dtype))
        self.register_buffer("gate_up_proj_scale", torch.empty(num_experts, 1, 2 * inner))
        self.register_buffer("down_proj", torch.empty(num_experts, inner, dim, dtype=code_dtype))
        self.register_buffer("down_proj_scale", torch.empty(num_experts, 1, dim))

    @classmethod
    def from_float(cls, experts: SwiGLUExperts, method: str) -> QuantizedSwiGLUExperts:
        E, D, F2 = experts.gate_up_proj.shape
        with torch.device("meta"):
            module = cls(D, F2 // 2, E, method)
        module.set_weight("gate_up_proj", experts.gate_up_proj.detach())
        module.set_weight("down_proj", experts.down_proj.detach())
        return module

    def set_weight(self, name: str, w_EIO: torch.Tensor) -> None:
        """Quantize one high-precision stacked weight into this module (the streaming loader calls this per
        tensor, so the full-precision copy of a layer is dropped as soon as its codes exist)."""
        if name not in ("gate_up_proj", "down_proj"):
            raise ValueError(f"experts weight {name!r} unknown; accepted: gate_up_proj, down_proj")
        codes, scale = quantize_columns(w_EIO, self.method)
        setattr(self, name, codes)
        setattr(self, f"{name}_scale", scale)

    @property
    def weight(self) -> torch.Tensor:
        """The gate_up codes: where tools that place adapters (peft) read a layer's device from."""
        return self.gate_up_proj

    def _matmul(self, x_ETI: torch.Tensor, name: str) -> torch.Tensor:
        w = _codes_as_float(getattr(self, name), self.method, x_ETI.dtype)
        return torch.bmm(x_ETI, w) * getattr(self, f"{name}_scale").to(x_ETI.dtype)

    def forward(self, x_ETD: torch.Tensor) -> torch.Tensor:
        gate, up = self._matmul(x_ETD, "gate_up_proj").chunk(2, dim=-1)
        return self._matmul(F.silu(gate) * up, "down_proj")

    def extra_repr(self) -> str:
        E, D, F2 = self.gate_up_proj.shape
        return f"experts={E}, dim={D}, inner={F2 // 2}, method={self.method}"
