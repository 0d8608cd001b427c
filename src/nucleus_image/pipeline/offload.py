"""Block offload for small cards: the transformer blocks' weights live in host memory and each layer moves onto
the accelerator only for its own forward, then back; everything outside the blocks (embeddings, output norm and
head) stays on the accelerator. Peak weight memory becomes the non-block weights plus the largest single layer
(one block's experts: about 0.5 GB of the released model in bf16) instead of the whole transformer, at the cost of
copying every block's weights over the bus on every step.

    handles = offload_blocks(pipe.transformer, "cuda")
    images = pipe(prompt).images
    for h in handles: h.remove()          # hooks off; blocks stay where they are (host memory)

Hooks sit on the modules that hold tensors themselves (linears, norms, experts), so the per-prompt text K/V
path (`encode_text`, which calls the blocks' projections but not their forward) is covered too.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from nucleus_image.model import NucleusTransformer


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))


def offload_blocks(transformer: NucleusTransformer, device, storage="cpu") -> list[RemovableHandle]:
    """Put the transformer's non-block modules on `device`, its blocks on `storage`, and hook every tensor-holding
    module of the blocks to visit `device` for its forward. Returns the hook handles."""
    device, storage = torch.device(device), torch.device(storage)
    for name, child in transformer.named_children():
        child.to(storage if name == "transformer_blocks" else device)

    def fetch(module, args):
        module.to(device)

    def release(module, args, output):
        module.to(storage)

    handles = []
    for block in transformer.blocks():
        for module in block.modules():
            if _holds_tensors(module):
                handles += [module.register_forward_pre_hook(fetch), module.register_forward_hook(release)]
    return handles
