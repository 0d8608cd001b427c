"""The `nucleus` command. Each subcommand lives in its own module here and exposes `register(subparsers)`.

    nucleus --help
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules under nucleus_image.cli, each adding one top-level subcommand.
COMMANDS = ("model", "data", "eval", "generate", "train", "merge", "inspect_routing", "ablate", "bench", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nucleus", description="Nucleus-Image: sparse-MoE text-to-image diffusion")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"nucleus_image.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        # Bad input is reported in one line that names the value; tracebacks are for bugs.
        print(f"nucleus {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
