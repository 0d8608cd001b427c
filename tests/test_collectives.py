"""The NCCL bug class on a CPU: every collective of the training code goes through `parallel.collectives`, which
runs device collectives on the training device only.

An NCCL process group serves CUDA tensors only, and the CPU tests run on gloo, which serves CPU tensors; so a
collective handed a tensor on the wrong device (the loss all-reduced as a CPU float on a GPU run) works in every
CPU test and stops every GPU run at its first step. No CPU run can show that directly. What a CPU run can check:
(1) no module of the training code calls a torch.distributed collective itself, so there is one place that
decides the device; (2) that place refuses a tensor that is not on the run's device, whatever device the run
has, so the CPU runs exercise the very check a GPU run depends on."""

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from nucleus_image.parallel import collectives

SRC = Path(collectives.__file__).resolve().parents[1]
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_object",
    "all_to_all",
    "all_to_all_single",
    "barrier",
    "broadcast",
    "broadcast_object_list",
    "gather",
    "gather_object",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "scatter",
    "send",
    "recv",
    "monitored_barrier",
}


def distributed_calls(path: Path) -> list[str]:
    """`torch.distributed.<collective>(...)` / `dist.<collective>(...)` calls in one file, as file:line."""
    tree = ast.parse(path.read_text())
    aliases = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in COLLECTIVES
            and ast.unparse(node.func.value) in aliases
        ):
            found.append(f"{path.relative_to(SRC)}:{node.lineno} {ast.unparse(node.func)}")
    return found


def test_training_code_runs_no_collective_of_its_own():
    files = [p for pkg in ("training", "lora", "cli") for p in (SRC / pkg).rglob("*.py")]
    assert len(files) > 20
    calls = [c for f in files for c in distributed_calls(f)]
    assert calls == [], f"collectives outside parallel/collectives.py: {calls}"
    # The scan finds what it looks for: the collectives module itself has them.
    assert len(distributed_calls(SRC / "parallel" / "collectives.py")) >= 4


def test_device_collectives_refuse_a_tensor_off_the_training_device():
    # A run whose training device is not the CPU (the meta device stands in for a GPU): a CPU tensor is refused
    # by name before any process group is touched, as an NCCL run needs.
    dims = SimpleNamespace(device=torch.device("meta"), world=2)
    with pytest.raises(ValueError, match=r"mean_over_ranks: a tensor on cpu, but this run's collectives run on meta"):
        collectives.mean_over_ranks(torch.tensor([1.0]), dims)
    weight = torch.nn.Parameter(torch.ones(2))
    weight.grad = torch.ones(2)
    with pytest.raises(ValueError, match=r"clip_grad_norm_: a tensor on cpu, but this run's collectives run on meta"):
        collectives.clip_grad_norm_([weight], 1.0, dims)


def test_muon_exchange_refuses_a_buffer_off_its_parameters_device():
    # Muon's all-to-all of row-split weights runs on the device of the parameters it updates; a buffer elsewhere is
    # refused by name before the (here absent) process group is touched.
    with pytest.raises(ValueError, match=r"all_to_all_split: a tensor on cpu, but this run's collectives run on meta"):
        collectives.all_to_all_split(torch.zeros(4), [2, 2], [2, 2], None, torch.device("meta"))
