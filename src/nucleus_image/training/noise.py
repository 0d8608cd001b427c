"""The noise and sigma of each training sample, drawn for this process's own rows only, from a generator seeded by
(seed, step, global row): any layout of processes, and any number of them, trains on exactly the numbers one
process would, and no process draws another's rows (a global batch's noise at the released size is 268 MB).

    noise_BSC, sigma_B = row_noise(seed, step, rows, (tokens, channels), timesteps, device)
"""

from __future__ import annotations

import numpy as np
import torch

from .config import TimestepConfig
from .timesteps import sample_sigmas

# Mixed into the seed so the noise streams are independent of the batch plan's (data_loader._STREAM).
_STREAM = 0x6E6F_6973


def row_seed(seed: int, step: int, row: int) -> int:
    """A 64-bit seed for one row of one step's global batch."""
    return int(np.random.SeedSequence([seed, _STREAM, step, row]).generate_state(1, np.uint64)[0])


def row_noise(
    seed: int,
    step: int,
    rows,
    shape: tuple[int, ...],
    timesteps: TimestepConfig,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(len(rows), *shape) noise and (len(rows),) float32 sigmas for global rows `rows` of step `step`, on
    `device` (a generator there: nothing is drawn on the host and copied). `shape[0]` is the image tokens, which
    set the sigma distribution's shift."""
    noise, sigmas = [], []
    for row in rows:
        generator = torch.Generator(device).manual_seed(row_seed(seed, step, int(row)))
        sigmas.append(sample_sigmas(1, shape[0], timesteps, generator))
        noise.append(torch.randn(shape, generator=generator, device=device, dtype=dtype))
    return torch.stack(noise), torch.cat(sigmas)
