"""The Nucleus MoE transformer in plain PyTorch, with the diffusers checkpoint format."""

from .config import PRESETS, NucleusConfig
from .moe import Routing
from .transformer import NucleusTransformer, NucleusTransformerOutput, TextKV

__all__ = ["PRESETS", "NucleusConfig", "NucleusTransformer", "NucleusTransformerOutput", "Routing", "TextKV"]
