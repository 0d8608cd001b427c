"""`nucleus model info|init`: inspect a model configuration, or write a freshly initialised checkpoint.

    nucleus model info --preset released
    nucleus model init --preset tiny --out models/tiny-init --seed 0
"""

from __future__ import annotations

import json


def _config(args):
    from nucleus_image.model import NucleusConfig

    if args.model:
        return NucleusConfig.from_json(_config_path(args.model))
    return NucleusConfig.preset(args.preset)


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
    print(f"parameters: {counts['total'] / 1e9:.3f}B total, {counts['active_per_token'] / 1e9:.3f}B active per token")
    print(f"MoE layers: {cfg.moe_layers} of {cfg.num_layers}; experts {cfg.num_experts} x {cfg.moe_intermediate_dim}")
    return 0


def _init(args) -> int:
    import torch

    from nucleus_image.model import NucleusTransformer

    cfg = _config(args)
    model = NucleusTransformer(cfg)
    model.reset_parameters(torch.Generator().manual_seed(args.seed))
    model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]).save_pretrained(args.out)
    print(f"wrote {args.out} ({cfg.param_counts()['total'] / 1e6:.1f}M parameters, {args.dtype})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("model", help="inspect a model config or write an initialised checkpoint")
    sub = parser.add_subparsers(dest="model_command", required=True)
    for name, func, text in (("info", _info, "print config and parameter counts"), ("init", _init, "write a fresh checkpoint")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--preset", default="tiny", help="released | small | tiny")
        p.add_argument("--model", default=None, help="a transformer or pipeline folder (instead of --preset)")
        if name == "init":
            p.add_argument("--out", required=True)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
        p.set_defaults(func=func)
