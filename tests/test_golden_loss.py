"""Golden loss: the first 30 steps of a fixed micro run (synthetic data seed 7, MiniLM captions, Muon + AdamW,
two stages with aspect buckets and a capacity-factor change) match a stored curve. Any change to the numerics
of the model, objective, optimiser, sampling of data/timesteps or the caption cache shows up here.

Regenerate deliberately (and say why in the commit) with:
    NUCLEUS_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden_loss.py
"""

import json
import os
from pathlib import Path

import numpy as np
import torch
from training_helpers import micro_config, micro_dataset

from nucleus_image.training.trainer import Trainer

GOLDEN = Path(__file__).parent / "data" / "golden_loss_micro.json"


def test_first_30_steps_match_the_stored_curve(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = Trainer(
            micro_config(), micro_dataset(tmp_path / "data"), tmp_path / "run", max_steps=30, progress=False
        ).train()
    finally:
        torch.set_num_threads(threads)
    losses = np.array(result.losses)
    assert len(losses) == 30 and np.isfinite(losses).all() and result.nonfinite_skipped == 0
    if os.environ.get("NUCLEUS_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps({"steps": 30, "losses": losses.tolist()}, indent=1) + "\n")
    golden = np.array(json.loads(GOLDEN.read_text())["losses"])
    # float32 on CPU; the tolerance leaves room only for a different CPU's matmul kernels.
    np.testing.assert_allclose(losses, golden, rtol=1e-4, atol=0)
    assert losses[-5:].mean() < 0.6 * losses[:5].mean()  # and the curve is one of learning
