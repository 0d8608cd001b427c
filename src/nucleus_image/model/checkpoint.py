"""The diffusers checkpoint format: `config.json` beside `diffusion_pytorch_model.safetensors`, or shards
`diffusion_pytorch_model-0000i-of-0000n.safetensors` with `diffusion_pytorch_model.safetensors.index.json`.

Loading builds the model on the meta device and assigns each tensor straight from the memory-mapped file in
the target dtype and device, so a 17B checkpoint never exists as an fp32 copy in host memory. Saving writes
into a temporary folder and renames it into place, so an interrupted save never leaves a half-written model.
Weights are only ever read with safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import NucleusConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
# Beside config.json in a transformer folder saved with 8-bit weights (nucleus_image.quantization reads and
# writes that layout; the plain loader only recognises it to refuse it clearly).
QUANTIZATION_CONFIG = "quantization_config.json"


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    raise ValueError(f"max_shard_size {size!r} not understood; use bytes or e.g. '5GB', '500MB'")


def _weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX_NAME).exists():
        index = json.loads((folder / INDEX_NAME).read_text())
        return [folder / name for name in sorted(set(index["weight_map"].values()))]
    if (folder / WEIGHTS_NAME).exists():
        return [folder / WEIGHTS_NAME]
    found = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"{str(folder)!r} holds no {WEIGHTS_NAME} or {INDEX_NAME} (found: {found})")


def resolve_pretrained(name) -> Path:
    """A local folder as given, or a Hugging Face Hub model id ("owner/name", optionally "@revision")
    fetched through huggingface_hub's own cache: downloaded once, then read from the cache (HF_HUB_OFFLINE=1 reads
    only the cache; HF_HUB_CACHE / HF_HOME say where it is)."""
    path = Path(name)
    if path.exists() or not isinstance(name, str) or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    repo_id, _, revision = name.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None))
    except HFValidationError:
        return path
    except Exception as err:  # offline without a cached copy, unknown repository, no network: all the user's to fix
        raise ValueError(
            f"{name!r} is neither a local folder nor a Hugging Face Hub model id that could be fetched "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'})"
        ) from None


def load_pretrained(cls, path, dtype: torch.dtype | None = None, device="cpu", subfolder: str | None = None):
    """Build `cls` from a diffusers transformer folder. dtype None keeps the stored dtype."""
    folder = resolve_pretrained(path) / subfolder if subfolder else resolve_pretrained(path)
    if not (folder / CONFIG_NAME).exists() and (folder / "transformer" / CONFIG_NAME).exists():
        folder = folder / "transformer"  # a pipeline folder: take its transformer
    if not (folder / CONFIG_NAME).exists():
        raise FileNotFoundError(f"{str(folder)!r} is not a transformer folder: no {CONFIG_NAME}")
    if (folder / QUANTIZATION_CONFIG).exists():
        raise ValueError(
            f"{str(folder)!r} holds 8-bit weights ({QUANTIZATION_CONFIG}); load it with "
            f"nucleus_image.quantization.load_transformer(path) or NucleusPipeline.from_pretrained"
        )
    config = NucleusConfig.from_json(folder / CONFIG_NAME)
    with torch.device("meta"):
        model = cls(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}

    state: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[str] = []
    for key, tensor in checked_tensors(folder, expected, unexpected, mismatched):
        state[key] = tensor.to(device=device, dtype=dtype or tensor.dtype)
    refuse_misfit(folder, config, expected, set(state), unexpected, mismatched)
    model.load_state_dict(state, assign=True)
    return model.eval()


def checked_tensors(folder: Path, expected: dict, unexpected: list[str], mismatched: list[str]):
    """(name, tensor) for each stored tensor the model expects with its shape, read one at a time from the
    memory-mapped shards; names the model lacks and wrong shapes are collected instead, for one error."""
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle has keys() but is not iterable)
                if key not in expected:
                    unexpected.append(key)
                    continue
                shape = tuple(f.get_slice(key).get_shape())
                if shape != tuple(expected[key]):
                    mismatched.append(f"{key}: checkpoint {shape} vs model {tuple(expected[key])}")
                    continue
                yield key, f.get_tensor(key)


def refuse_misfit(
    folder: Path, config, expected: dict, loaded: set[str], unexpected: list[str], mismatched: list[str]
) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor, if there are any."""
    missing = sorted(set(expected) - loaded - {m.split(":")[0] for m in mismatched})
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (("missing", missing), ("unexpected", sorted(unexpected)), ("mis-shaped", mismatched)):
            if items:
                parts.append(f"{len(items)} {label}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise ValueError(f"checkpoint {str(folder)!r} does not fit {config}: " + "; ".join(parts))


def apply_umask(folder: Path) -> None:
    """Give a freshly written folder the modes the user's umask asks for. safetensors writes its files 0600
    (through a private temporary file), which would hide shared weights from the rest of a team."""
    mask = os.umask(0)
    os.umask(mask)
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def save_pretrained(model, path, max_shard_size: int | str = "10GB") -> None:
    """Write config.json and safetensors shards (<= max_shard_size each) atomically into `path`."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    shards = split_shards(state, _parse_size(max_shard_size))

    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG_NAME).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(tmp / WEIGHTS_NAME), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata=metadata)
            weight_map.update({k: name for k in shard})
        total = sum(tensor_bytes(t) for t in state.values())
        (tmp / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    publish_folder(tmp, path)


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def split_shards(state: dict, limit: int, nbytes=tensor_bytes) -> list[dict]:
    """The state dict cut, in key order, into shards of at most `limit` bytes (a larger tensor alone)."""
    shards: list[dict] = []
    current: dict = {}
    size = 0
    for key, tensor in state.items():
        n = nbytes(tensor)
        if current and size + n > limit:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += n
    shards.append(current)
    return shards


def publish_folder(tmp: Path, path: Path) -> None:
    """Make the fully written folder `tmp` the folder `path` (replacing an old one by renames: a reader sees the
    old folder or the new one, never a mix), with the modes the user's umask asks for."""
    apply_umask(tmp)
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
