"""The state of a run besides its weights and optimizer: what a checkpoint saves next to them and a resume restores.

    state = TrainState()
    state.record(out.loss, out.applied, out.grad_norm)    # every step: device tensors, nothing read back
    state.flush(mean_over_ranks)                            # logging steps and saves: one transfer
    ckpt.save_checkpoint(run_dir, model, config, optimizers, state, keep_last)   # trainer.json + rng.safetensors

`step` is the number of optimizer steps taken and also the run's data position: a step's batch, noise and sigmas
are pure functions of (seed, step), so nothing else about the data stream needs saving. `losses` and
`grad_norms` hold one value per step, `nonfinite` counts the steps skipped because their gradient was not finite.
`generator` / `np_rng` are streams a run draws from in order (fine-tuning's batches); a run whose draws are all
seeded by step has none.

A step's numbers stay on the device until `flush`, which reads every step recorded since the last one back at once:
a run reads its losses only on logging steps and at checkpoints, so its steps never wait for the host.

`heads` / `heads_optimizer`: training-only modules outside the model (an alignment head), saved and restored with
the state, never with the model's weights. `ema`: the moving average of the weights (`ema.WeightEMA`, with
`ema_decay` > 0), saved and restored with the state in a file of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from .ema import WeightEMA


class NonFiniteLossError(ValueError):
    pass


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    nonfinite: int = 0
    nonfinite_in_a_row: int = 0
    data: dict = field(default_factory=dict)  # how the run's sampler describes its position (for readers)
    generator: torch.Generator | None = None
    np_rng: np.random.Generator | None = None
    # Training-only modules outside the model (the alignment head) and their optimizer: checkpoints save them
    # beside the model's weights (heads.safetensors), never in them.
    heads: torch.nn.Module | None = None
    heads_optimizer: torch.optim.Optimizer | None = None
    ema: WeightEMA | None = None  # the weights' moving average (ema.safetensors), with ema_decay > 0
    _pending: list[torch.Tensor] = field(default_factory=list, repr=False)

    def record(self, loss: torch.Tensor, applied: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """Count step `step`: its loss, whether its update was applied, its gradient norm (device scalars, kept on
        the device until `flush`)."""
        self._pending.append(torch.stack([loss.double(), applied.double(), grad_norm.double()]))
        self.step += 1

    def flush(
        self,
        mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
        limit: int | None = None,
        last_checkpoint: Callable[[], object] = lambda: None,
    ) -> None:
        """Read the steps recorded since the last flush back to the host, in one transfer; `mean` averages the
        losses over processes (a collective: every rank flushes at the same steps). A step whose update was not
        applied (its gradient was not finite) is counted; once `limit` of them came in a row the run stops with
        NonFiniteLossError, naming the newest checkpoint `last_checkpoint()` finds (all are from good steps)."""
        if not self._pending:
            return
        rows = torch.stack(self._pending)
        self._pending = []
        if mean is not None:
            rows = mean(rows)
        first = self.step - rows.shape[0]
        stopped_at = None
        for i, (loss, applied, grad_norm) in enumerate(rows.tolist()):
            self.losses.append(loss)
            self.grad_norms.append(grad_norm)
            if applied:
                self.nonfinite_in_a_row = 0
                continue
            self.nonfinite += 1
            self.nonfinite_in_a_row += 1
            if limit is not None and self.nonfinite_in_a_row >= limit and stopped_at is None:
                stopped_at = (first + i, self.nonfinite_in_a_row)
        if stopped_at is not None:
            step, count = stopped_at
            raise NonFiniteLossError(
                f"{count} non-finite losses in a row at step {step} (limit {limit}); stopping. The last good "
                f"checkpoint is {last_checkpoint() or 'none (no checkpoint written yet)'}; lower the learning "
                f"rate or check the data, then --resume"
            )

    def state_dict(self) -> dict:
        """trainer.json's content (the checkpoint adds the host RNG states)."""
        if self._pending:
            raise RuntimeError(f"{len(self._pending)} recorded steps not read back: flush() before saving")
        return {
            "step": self.step,
            "losses": list(self.losses),
            "grad_norms": list(self.grad_norms),
            "nonfinite": self.nonfinite,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "sampler": dict(self.data),
        }

    def load_state_dict(self, saved: dict) -> None:
        """From trainer.json (older files lack the counters, a run that never skipped a step, and the gradient
        norms, NaN for those steps)."""
        self.step, self.losses = int(saved["step"]), list(saved.get("losses", []))
        self.grad_norms = list(saved.get("grad_norms", [math.nan] * len(self.losses)))
        self.nonfinite = int(saved.get("nonfinite", 0))
        self.nonfinite_in_a_row = int(saved.get("nonfinite_in_a_row", 0))
        self.data = dict(saved.get("sampler", {}))
        self._pending = []
