"""Shared pieces of the training tests: a micro dataset from the synthetic generator and a micro config that
trains in well under a second per step on 2 CPU cores (not the demo's `tiny` preset)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from model_helpers import micro_config as micro_model_config

from nucleus_image.data.synthetic import SynthConfig, generate_dataset
from nucleus_image.model import NucleusConfig, NucleusTransformer
from nucleus_image.training.config import OptimizerConfig, StageConfig, TrainConfig
from nucleus_image.training.loss import FlowBatch, FlowObjective

MICRO_MODEL = NucleusConfig.preset("tiny").replace(
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=3,
    num_key_value_heads=1,
    axes_dims_rope=(4, 14, 14),
    num_experts=4,
    moe_intermediate_dim=32,
    capacity_factors=(0.0, 2.0),
    dense_moe_strategy="leave_first_block_dense",
)


def micro_config(**overrides) -> TrainConfig:
    cfg = TrainConfig(
        model=MICRO_MODEL,
        cpu_threads=1,
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=5),
        checkpoint_every=5,
        keep_last=3,
        merge_last=3,
        log_every=5,
        sample_every=0,
        sample_steps=2,
        sample_prompts=("a red circle",),
        caption_weights=(1.0, 1.0, 0.0, 0.0),
        stages=[
            StageConfig("16px", 20, 16, 4, ("1:1", "4:3"), (0.0, 4.0), (), (2, 2, 1, 1, 1, 1, 1, 1)),
            StageConfig("24px", 10, 24, 2, ("1:1", "3:4"), (0.0, 2.0)),
        ],
    )
    return cfg.override([f"{k}={v}" for k, v in overrides.items()]) if overrides else cfg


def legacy_layout(config: dict) -> dict:
    """A train/finetune config dict in the layout written before the nested optimizer section: its fields flat,
    under their old names (`optimizer` the kind, `adam_betas`, `adam_eps`, ...)."""
    from nucleus_image.training.config import LEGACY_OPTIMIZER_KEYS

    old_name = {new: old for old, new in LEGACY_OPTIMIZER_KEYS.items()}
    flat = {k: v for k, v in config.items() if k != "optimizer"}
    # Fields added after the flat layout (schedule, min_lr_ratio) have no old name: an old file never held them.
    flat.update({old_name[k]: v for k, v in config["optimizer"].items() if k in old_name})
    return flat


def micro_dataset(root: Path) -> Path:
    generate_dataset(root, 48, seed=7, config=SynthConfig(size=32), heldout_per_task=2, progress=False)
    return root


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from nucleus_image.cli import main; sys.exit(main())", *args]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONHASHSEED="0")
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout, env=env)


def fixed_batch(seed: int = 0):
    """The micro model (seeded) and one fixed flow-matching batch of 4 rows at 8x8, with its objective."""
    cfg = micro_model_config()
    torch.manual_seed(seed)
    model = NucleusTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    B, h, w = 4, 8, 8
    x0 = torch.randn(B, (h // 2) * (w // 2), cfg.in_channels, generator=g)
    batch = FlowBatch(
        x0,
        torch.randn(x0.shape, generator=g),
        torch.rand(B, generator=g),
        torch.randn(B, 5, cfg.joint_attention_dim, generator=g),
        None,
        (h, w),
    )
    return model, batch, FlowObjective(cfg.patch_size, z_loss_weight=1e-3)
