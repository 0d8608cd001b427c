"""Peak host memory when loading a large random checkpoint, ours (meta device, direct dtype) vs diffusers.

    python benchmarks/load_memory.py --layers 4 --dtype bf16

Writes a released-width checkpoint with `--layers` blocks (each MoE block is ~0.55B parameters) in bf16, then
loads it in fresh subprocesses and reports each loader's peak resident memory against the file size. A loader
that first built an fp32 model would peak near 3x the bf16 file size. Ours assigns the safetensors tensors
(memory-mapped, copy-on-write) straight into a meta-built model, so pages become resident as weights are read.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LOADERS = {
    "ours": "from nucleus_image.model import NucleusTransformer as M; m = M.from_pretrained(path, dtype=torch.bfloat16)",
    "diffusers": "from diffusers import NucleusMoEImageTransformer2DModel as M; m = M.from_pretrained(path, torch_dtype=torch.bfloat16)",
}
# VmHWM (peak resident set) of the fresh process; ru_maxrss would carry the parent's peak across exec.
PROBE = """
import sys, torch
hwm = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
path = sys.argv[1]
before = hwm()
{load}
loaded = hwm()
n = sum(p.numel() for p in m.parameters())
torch.stack([p.detach().sum() for p in m.parameters()])  # read every weight once
print(before, loaded, hwm(), n)
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    args = ap.parse_args(argv)

    import torch

    from nucleus_image.model import NucleusConfig, NucleusTransformer

    cfg = NucleusConfig.preset("released").replace(num_layers=args.layers, dense_moe_strategy="leave_first_block_dense")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "ckpt"
        torch.set_default_dtype(torch.bfloat16)  # build straight in bf16: the writer should not need fp32 either
        model = NucleusTransformer(cfg)
        torch.set_default_dtype(torch.float32)
        model.save_pretrained(path, max_shard_size="1GB")
        del model
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        print(
            f"# checkpoint: {cfg.param_counts()['total'] / 1e9:.2f}B parameters, {size / 2**30:.2f} GiB bf16 in "
            f"{len(list(path.glob('*.safetensors')))} shards"
        )
        for name, load in LOADERS.items():
            out = subprocess.run(
                [sys.executable, "-c", PROBE.format(load=load), str(path)], capture_output=True, text=True
            )
            if out.returncode:
                print(f"{name:10s} failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            before, loaded, peak, n = map(int, out.stdout.split()[-4:])
            gib = lambda kib: kib * 1024 / 2**30  # noqa: E731 (VmHWM is in KiB)
            print(
                f"{name:10s} peak RSS after load {gib(loaded):6.2f} GiB, after reading every weight {gib(peak):6.2f} GiB "
                f"= {peak * 1024 / size:4.2f}x the checkpoint (interpreter + imports {gib(before):.2f} GiB), "
                f"{n / 1e9:.2f}B parameters"
            )
        print(json.dumps({"checkpoint_gib": round(size / 2**30, 3)}))


if __name__ == "__main__":
    main()
