"""The state of a run besides its weights and optimizer: what a checkpoint saves next to them and a resume restores.

    state = TrainState()
    ckpt.save_checkpoint(run_dir, model, config, optimizers, state, keep_last)   # trainer.json + rng.safetensors
    ckpt.load_checkpoint(path, model, optimizers, state)

`step` is the number of optimizer steps taken and also the run's data position: a step's batch, noise and sigmas
are pure functions of (seed, step), so nothing else about the data stream needs saving. `losses` holds one loss
per step, `nonfinite` counts the steps skipped because their gradient was not finite. `generator` / `np_rng` are
streams a run draws from in order (fine-tuning's batches); a run whose draws are all seeded by step has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)
    nonfinite: int = 0
    nonfinite_in_a_row: int = 0
    data: dict = field(default_factory=dict)  # how the run's sampler describes its position (for readers)
    generator: torch.Generator | None = None
    np_rng: np.random.Generator | None = None

    def record(self, loss: float, applied: bool, limit: int | None = None,
               last_checkpoint: Callable[[], object] = lambda: None) -> None:
        """Count step `step`: its loss, and whether its update was applied. A step whose gradient was not finite
        was skipped; after `limit` of them in a row the run stops (NonFiniteLossError, naming the newest
        checkpoint `last_checkpoint()` finds: they are all from good steps)."""
        self.losses.append(loss)
        if applied:
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite += 1
            self.nonfinite_in_a_row += 1
        if limit is not None and self.nonfinite_in_a_row >= limit:
            raise NonFiniteLossError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row at step {self.step} (limit "
                f"max_nonfinite_in_a_row={limit}); stopping. The last good checkpoint is "
                f"{last_checkpoint() or 'none (no checkpoint written yet)'}; lower lr or check "
                f"the data, then --resume")
        self.step += 1

    def state_dict(self) -> dict:
        """trainer.json's content (the checkpoint adds the host RNG states)."""
        return {"step": self.step, "losses": list(self.losses), "nonfinite": self.nonfinite,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "sampler": dict(self.data)}

    def load_state_dict(self, saved: dict) -> None:
        """From trainer.json (older files may lack the counters: a run that never skipped a step)."""
        self.step, self.losses = int(saved["step"]), list(saved.get("losses", []))
        self.nonfinite = int(saved.get("nonfinite", 0))
        self.nonfinite_in_a_row = int(saved.get("nonfinite_in_a_row", 0))
        self.data = dict(saved.get("sampler", {}))
