"""An exponential moving average of the transformer's weights: the usual companion of AdamW in diffusion training,
and the baseline Warmup-Stable-Merge's checkpoint merge stands in for.

    ema = WeightEMA(model, decay=0.999)
    ema.update(out.applied)          # after every step: on the device, nothing read back
    ema.state_dict()                 # {parameter name: float32 tensor}, saved as ema.safetensors in a checkpoint

After a step whose update was applied, ema = decay * ema + (1 - decay) * weights; after a skipped step (a
non-finite gradient) it is left as it was. The decision stays on the device: the step's `applied` flag scales the
interpolation weight to 0, so no step waits for the host. The average starts at the weights it is built from (the
initial weights, or a resumed checkpoint's average) and covers about the last 1 / (1 - decay) steps.

It is kept in float32 whatever the weights' dtype (4 bytes per parameter, `nbytes`): with a decay near 1 the
per-step change (1 - decay) * (weights - ema) would round away in bf16.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class WeightEMA:
    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        named = [(n, p) for n, p in model.named_parameters() if torch.is_floating_point(p)]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [p.detach().to(torch.float32, copy=True) for p in self.params]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.shadow)

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.shadow)

    @torch.no_grad()
    def update(self, applied: torch.Tensor) -> None:
        """Move the average toward the current weights; `applied`: the step's device flag (False: unchanged)."""
        weight = applied.to(torch.float32) * (1.0 - self.decay)
        current = [p.detach() if p.dtype == torch.float32 else p.detach().float() for p in self.params]
        torch._foreach_lerp_(self.shadow, current, weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        """From `state_dict`'s output (a checkpoint's ema.safetensors); every tensor must be there, in its shape."""
        missing, unknown = sorted(set(self.names) - set(saved)), sorted(set(saved) - set(self.names))
        if missing or unknown:
            raise ValueError(f"EMA state does not fit the model: missing {missing[:5]}, unknown {unknown[:5]}")
        for name, t in zip(self.names, self.shadow):
            if saved[name].shape != t.shape:
                raise ValueError(
                    f"EMA tensor {name!r} has shape {tuple(saved[name].shape)}, the model {tuple(t.shape)}"
                )
            t.copy_(saved[name])
