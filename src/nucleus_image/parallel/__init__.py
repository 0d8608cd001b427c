"""Training at scale with torch.distributed: the layout config, device meshes, FSDP2 + expert parallelism
applied from outside the model (`parallelize`), cross-mesh reductions, and the `--nproc` launcher.

    nucleus train --preset tiny --data data/synth --out runs/x --nproc 2 --set parallel.ep=2
    torchrun --nnodes 2 --nproc-per-node 8 ... -m nucleus_image train --preset released ... --set parallel.ep=8
"""

from .config import ParallelConfig

__all__ = ["ParallelConfig"]
