"""`nucleus model info|init`: inspect a model configuration, or write a freshly initialised checkpoint.

nucleus model info --preset released
nucleus model info --model runs/tiny/merged
nucleus model init --preset tiny --out models/tiny-init --seed 0
nucleus model init --preset small --out models/small-init --dtype bfloat16
"""

from __future__ import annotations

import json

from nucleus_image.model.config import PRESETS


def _config(args):
    from nucleus_image.model import NucleusConfig

    if args.model:
        return NucleusConfig.from_json(_config_path(args.model))
    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} is not a model preset; accepted: {', '.join(PRESETS)}")
    return NucleusConfig.preset(args.preset)


def count(n: int) -> str:
    """Parameter counts the way model cards write them: 17.123B, 85.4M, 12.3K."""
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3f}{unit}" if unit == "B" else f"{n / scale:.1f}{unit}"
    return str(n)


def _config_path(folder: str):
    from pathlib import Path

    for candidate in (Path(folder) / "config.json", Path(folder) / "transformer" / "config.json"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{folder!r} holds no config.json (nor transformer/config.json)")


def _info(args) -> int:
    cfg = _config(args)
    counts = cfg.param_counts()
    print(json.dumps(cfg.to_dict(), indent=1))
    print(f"parameters: {count(counts['total'])} total, {count(counts['active_per_token'])} active per token")
    print(f"MoE layers: {cfg.moe_layers} of {cfg.num_layers}; experts {cfg.num_experts} x {cfg.moe_intermediate_dim}")
    return 0


def _init(args) -> int:
    import torch

    from nucleus_image.model import NucleusTransformer

    cfg = _config(args)
    model = NucleusTransformer(cfg)
    model.reset_parameters(torch.Generator().manual_seed(args.seed))
    model.to(getattr(torch, args.dtype)).save_pretrained(args.out)
    print(f"wrote {args.out} ({count(cfg.param_counts()['total'])} parameters, {args.dtype})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("model", help="inspect a model config or write an initialised checkpoint")
    sub = parser.add_subparsers(dest="model_command", required=True)
    for name, func, text in (
        ("info", _info, "print config and parameter counts"),
        ("init", _init, "write a fresh checkpoint"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--preset", default="tiny", help=f"model preset; accepted: {', '.join(PRESETS)}")
        p.add_argument("--model", default=None, help="a transformer or pipeline folder (instead of --preset)")
        if name == "init":
            p.add_argument("--out", required=True, help="transformer folder to write (config.json + safetensors)")
            p.add_argument("--seed", type=int, default=0, help="seed of the initialisation")
            p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="stored dtype")
        p.set_defaults(func=func)
