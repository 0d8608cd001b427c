"""LoRA on 8-bit stacked experts (QLoRA for the routed experts), as a peft custom layer.

peft's `target_parameters` adapts plain (E, in, out) parameters, but QuantizedSwiGLUExperts holds int8 / e4m3 codes
as buffers. This layer keeps them frozen and adds per-expert low-rank factors inside each batched matmul:

    gate_up = bmm(x, codes) * scale + bmm(bmm(x, B_gate_up), A_gate_up) * alpha / r      B (E, D, r), A (E, r, 2F)
    out     = bmm(h, codes) * scale + bmm(bmm(h, B_down), A_down) * alpha / r            B (E, F, r), A (E, r, D)

so no full-size weight is ever formed. The factors are those peft's `ParamWrapper` keeps for a plain expert stack,
seen per expert: peft treats an (E, in, out) stack as E (out, in)-style weights, so its lora_A (r*E, out) is E
(r, out) matrices on the output side, initialised like peft's (uniform, bound 1/sqrt(out)), and its lora_B
(in, r*E) is E zero (in, r) matrices on the input side (the output starts as the base's). Same names, same
per-expert matrices, same init: a bf16 and an 8-bit base train the same adapter with the same optimizer (Muon
orthogonalises each expert's factor on its own on both). The factors live in `lora_A` / `lora_B` like every peft
LoRA layer, so they save and load in peft's format; merging into 8-bit codes is refused (merge the adapter into
the high-precision model instead).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from nucleus_image.quantization.experts import QuantizedSwiGLUExperts

WEIGHTS = ("gate_up_proj", "down_proj")


class QuantizedExpertsLora(nn.Module, LoraLayer):
    def __init__(
        self,
        base_layer: QuantizedSwiGLUExperts,
        adapter_name: str,
        r: int = 0,
        lora_alpha: float = 1,
        init_lora_weights: bool | str = True,
        **kwargs: Any,
    ):
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha, init_lora_weights)

    def _get_in_out_features(self, module) -> tuple[int, int]:
        return module.gate_up_proj.shape[1], module.down_proj.shape[2]

    def update_layer(
        self, adapter_name: str, r: int, lora_alpha: float, init_lora_weights: bool | str = True, **kwargs: Any
    ) -> None:
        if r <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {r!r}")
        base = self.get_base_layer()
        device = base.gate_up_proj.device
        self.r[adapter_name], self.lora_alpha[adapter_name] = r, lora_alpha
        self.scaling[adapter_name] = lora_alpha / r
        a, b = nn.ParameterDict(), nn.ParameterDict()
        for name in WEIGHTS:
            E, fan_in, fan_out = getattr(base, name).shape
            bound = 1.0 / math.sqrt(fan_out)  # peft's kaiming-uniform(a=sqrt(5)) bound for its (r*E, out) lora_A
            a[name] = nn.Parameter(torch.empty(E, r, fan_out, device=device).uniform_(-bound, bound))
            b[name] = nn.Parameter(torch.zeros(E, fan_in, r, device=device))
        self.lora_A[adapter_name], self.lora_B[adapter_name] = a, b
        self.set_adapter(self.active_adapters)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        raise ValueError(
            "cannot merge a LoRA adapter into 8-bit expert codes; load the high-precision model, "
            "attach the adapter and merge there"
        )

    def _matmul(self, x_ETI: torch.Tensor, name: str) -> torch.Tensor:
        y = self.get_base_layer()._matmul(x_ETI, name)
        if self.disable_adapters:
            return y
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                a, b = self.lora_A[adapter][name].to(x_ETI.dtype), self.lora_B[adapter][name].to(x_ETI.dtype)
                y = y + torch.bmm(torch.bmm(x_ETI, b), a) * self.scaling[adapter]
        return y

    def forward(self, x_ETD: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        gate, up = self._matmul(x_ETD, "gate_up_proj").chunk(2, dim=-1)
        return self._matmul(F.silu(gate) * up, "down_proj")

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
