"""fp8 matmuls for speed on GPUs with fp8 tensor cores (compute capability >= 8.9): e4m3 weights *and* activations
through `torch._scaled_mm` with row-wise scales, for the routed experts and the attention projections.

Weight-only 8-bit (apply.py) saves memory but computes in bf16; here the matmul itself runs in fp8, which is what
can take the released model's step below its bf16 arithmetic floor. Scales:
  weights      one per output column (per expert), fixed at conversion: w ~= q_w * s_w
  activations  one per row (token), computed on the fly:                x ~= q_x * s_x
  so x @ w ~= (q_x @ q_w) * s_x * s_w, which `_scaled_mm` evaluates with fp32 accumulation.
cuBLASLt wants the weight column-major, so the codes are stored (out, in) row-major and passed transposed. The
same code runs on CPU (PyTorch implements `_scaled_mm` there too), which is how the tests check it against
quantise-dequantise-then-matmul.

    enable_fp8_compute(model)      # in place; NucleusPipeline(..., fp8_compute=True) and --fp8-compute do this
                                   # after check_fp8_compute(device); benchmarks/gpu_step.py times it
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nucleus_image.model.moe import SwiGLUExperts

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
ATTENTION_LINEARS = ("to_q", "to_k", "to_v", "to_out.0")
FP8_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) on: the first GPUs with fp8 tensor cores


def fp8_support_problem(device_type: str, capability: tuple[int, int] | None, name: str = "") -> str | None:
    """Why fp8 compute cannot run on this device (None when it can): it needs a CUDA GPU with fp8 tensor cores."""
    need = (
        f"fp8 compute runs its matmuls on fp8 tensor cores: it needs a CUDA GPU of compute capability >= "
        f"{FP8_CAPABILITY[0]}.{FP8_CAPABILITY[1]} (Ada, Hopper or newer)"
    )
    if device_type != "cuda":
        return f"{need}; the model is on {device_type}. For 8-bit weights without such a GPU use quantize='fp8'"
    if capability is None:
        return f"{need}; no CUDA GPU is available to this torch {torch.__version__}"
    if tuple(capability) < FP8_CAPABILITY:
        return f"{need}; {name or 'this GPU'} has compute capability {capability[0]}.{capability[1]}"
    return None


def check_fp8_compute(device: torch.device | str) -> None:
    """Refuse devices without fp8 tensor cores, saying what is needed."""
    device = torch.device(device)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    problem = fp8_support_problem(
        device.type,
        torch.cuda.get_device_capability(device) if cuda else None,
        torch.cuda.get_device_name(device) if cuda else "",
    )
    if problem:
        raise ValueError(problem)


def quantize_rows(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 codes and float32 scales (M, 1) of a 2-D activation."""
    amax = x_MK.abs().amax(dim=-1, keepdim=True).float().clamp_(min=1e-12)
    scale = amax / E4M3_MAX
    # Clamped: x / (amax / 448) can round just past 448, and saturation of the e4m3fn cast is not guaranteed.
    return (x_MK.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def scaled_matmul(x_MK: torch.Tensor, w_codes_NK: torch.Tensor, w_scale_1N: torch.Tensor) -> torch.Tensor:
    """x @ w in fp8: x quantized per row here, w given as (N, K) e4m3 codes with per-output scales (1, N)."""
    codes, scale = quantize_rows(x_MK)
    return torch._scaled_mm(codes, w_codes_NK.t(), scale_a=scale, scale_b=w_scale_1N, out_dtype=x_MK.dtype)


def _weight_codes(w_KN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) e4m3 codes and (1, N) float32 scales of a (K, N) weight used as x @ w."""
    w = w_KN.float()
    amax = w.abs().amax(dim=0, keepdim=True).clamp_(min=1e-12)
    scale = amax / E4M3_MAX
    return (w / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3).t().contiguous(), scale


class Float8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        codes, scale = _weight_codes(linear.weight.detach().t())
        self.register_buffer("weight_codes", codes)  # (out, in)
        self.register_buffer("weight_scale", scale)  # (1, out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = scaled_matmul(x.reshape(-1, x.shape[-1]), self.weight_codes, self.weight_scale)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class Float8Experts(nn.Module):
    """SwiGLU experts with fp8 matmuls, one `_scaled_mm` per expert (a CUDA graph removes the launch cost)."""

    def __init__(self, experts: SwiGLUExperts):
        super().__init__()
        for name in ("gate_up_proj", "down_proj"):
            w_EKN = getattr(experts, name).detach()
            pairs = [_weight_codes(w_EKN[e]) for e in range(w_EKN.shape[0])]
            self.register_buffer(f"{name}_codes", torch.stack([c for c, _ in pairs]))  # (E, N, K)
            self.register_buffer(f"{name}_scale", torch.stack([s for _, s in pairs]))  # (E, 1, N)

    def _matmul(self, x_ETK: torch.Tensor, name: str) -> torch.Tensor:
        codes, scale = getattr(self, f"{name}_codes"), getattr(self, f"{name}_scale")
        return torch.stack([scaled_matmul(x_ETK[e], codes[e], scale[e]) for e in range(codes.shape[0])])

    def forward(self, x_ETD: torch.Tensor) -> torch.Tensor:
        gate, up = self._matmul(x_ETD, "gate_up_proj").chunk(2, dim=-1)
        return self._matmul(F.silu(gate) * up, "down_proj")


def enable_fp8_compute(model: nn.Module) -> nn.Module:
    """Swap the routed experts and the image-side attention projections of a high-precision model for fp8
    matmul versions, in place. Router gates, text K/V projections, modulation and the head stay as they are."""
    if getattr(model, "quantization", None):
        raise ValueError(f"fp8 compute converts high-precision weights; this model holds {model.quantization} ones")
    for name, module in list(model.named_modules()):
        parent_name, _, child = name.rpartition(".")
        if isinstance(module, SwiGLUExperts):
            setattr(model.get_submodule(parent_name), child, Float8Experts(module))
        elif isinstance(module, nn.Linear) and any(name.endswith(".attn." + n) for n in ATTENTION_LINEARS):
            setattr(model.get_submodule(parent_name), child, Float8Linear(module))
    model.requires_grad_(False)
    return model


def uses_fp8_compute(model: nn.Module) -> bool:
    return any(isinstance(m, (Float8Linear, Float8Experts)) for m in model.modules())
