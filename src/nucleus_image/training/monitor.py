"""What a run shows while and after it trains: TensorBoard scalars (loss, lr, grad norm, images/s, per-layer
expert load and the share of tokens no expert picked), the sample grids as TensorBoard images (tab IMAGES,
tag `samples`, one per sampling step) and the loss-curve PNG.

    tensorboard --logdir runs/tiny/tensorboard
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def routing_stats(
    router_logits: tuple[torch.Tensor, ...], expert_indices: tuple[torch.Tensor, ...], seq_len: int
) -> torch.Tensor:
    """(layers, E + 2) float32 on the model's device, one row per MoE layer: each expert's share of the router's
    probability mass (`load`: expert choice gives every expert exactly C tokens, so the softmax mass is where
    imbalance shows), then the share of tokens only the shared expert saw and the mean experts per token.
    Computed on the device without reading anything back; `routing_table` turns it into numbers to log.
    Token choice's empty slots (index `seq_len`) are counted in an extra column that is then dropped."""
    rows = []
    for logits_BSE, idx_BEC in zip(router_logits, expert_indices):
        B, E, C = idx_BEC.shape
        load_E = torch.softmax(logits_BSE.detach().float(), dim=-1).mean(dim=(0, 1))
        counts = torch.zeros(B, seq_len + 1, device=idx_BEC.device)
        counts.scatter_add_(1, idx_BEC.reshape(B, E * C), torch.ones(B, E * C, device=idx_BEC.device))
        counts = counts[:, :seq_len]
        rows.append(torch.cat([load_E, (counts == 0).float().mean()[None], counts.mean()[None]]))
    return torch.stack(rows)


def routing_table(stats: torch.Tensor) -> dict:
    """`routing_stats` read back (one transfer): {layer: {"load", "no_expert_share", "experts_per_token"}}."""
    table = stats.detach().cpu().double().numpy()
    return {
        layer: {"load": row[:-2], "no_expert_share": float(row[-2]), "experts_per_token": float(row[-1])}
        for layer, row in enumerate(table)
    }


class RunLogger:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def scalars(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        images_per_s: float,
        nonfinite: int,
        routing: dict | None,
        extra: dict[str, float] | None = None,
    ) -> None:
        """One logging step's scalars; `extra`: the loss function's other logged values (e.g. "alignment")."""
        w = self.writer
        w.add_scalar("train/loss", loss, step)
        for name, value in (extra or {}).items():
            w.add_scalar(f"train/{name}", value, step)
        w.add_scalar("train/lr", lr, step)
        w.add_scalar("train/grad_norm", grad_norm, step)
        w.add_scalar("train/images_per_s", images_per_s, step)
        w.add_scalar("train/nonfinite_skipped", nonfinite, step)
        for layer, s in (routing or {}).items():
            w.add_scalar(f"routing/layer{layer:02d}/no_expert_share", s["no_expert_share"], step)
            w.add_scalar(f"routing/layer{layer:02d}/experts_per_token", s["experts_per_token"], step)
            w.add_scalar(f"routing/layer{layer:02d}/load_max_over_mean", float(s["load"].max() * len(s["load"])), step)
            for e, share in enumerate(s["load"]):
                w.add_scalar(f"routing/layer{layer:02d}/expert{e:02d}_load", float(share), step)

    def sample_grid(self, step: int, path: Path) -> None:
        """The grid PNG the trainer just wrote, also as a TensorBoard image with a step slider."""
        with Image.open(path) as grid:
            self.writer.add_image("samples", np.asarray(grid.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    @staticmethod
    def loss_curve(losses: list[float], path: Path, width: int = 800, height: int = 450) -> Path:
        """Raw losses in light grey and a moving average in blue, log-scaled y, axis labels in pixels' margin."""
        img = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(img)
        left, right, top, bottom = 70, width - 20, 30, height - 40
        values = np.array([v if math.isfinite(v) and v > 0 else np.nan for v in losses], dtype=np.float64)
        draw.text((left, 8), f"training loss ({len(losses)} steps; grey raw, blue moving average)", fill="black")
        if np.isfinite(values).sum() >= 2:
            window = max(1, len(values) // 50)
            kernel = np.ones(window) / window
            filled = np.where(np.isfinite(values), values, np.nanmean(values))
            smooth = np.convolve(filled, kernel, mode="valid")
            lo, hi = np.log10(np.nanmin(values)), np.log10(np.nanmax(values))
            hi = hi if hi > lo else lo + 1e-3

            def xy(i, v):
                x = left + (right - left) * i / max(len(values) - 1, 1)
                y = bottom - (bottom - top) * (math.log10(v) - lo) / (hi - lo)
                return x, y

            raw = [xy(i, v) for i, v in enumerate(values) if np.isfinite(v)]
            draw.line(raw, fill=(200, 200, 200), width=1)
            draw.line([xy(i + window - 1, v) for i, v in enumerate(smooth)], fill=(30, 80, 200), width=2)
            for frac in (0.0, 0.5, 1.0):
                y = bottom - (bottom - top) * frac
                draw.text((5, y - 6), f"{10 ** (lo + frac * (hi - lo)):.4f}", fill="black")
                draw.line([(left - 4, y), (left, y)], fill="black")
        draw.rectangle([left, top, right, bottom], outline="black")
        draw.text((left, bottom + 8), "step 0", fill="black")
        draw.text((right - 80, bottom + 8), f"step {len(losses)}", fill="black")
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path)
        return path
