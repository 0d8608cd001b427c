"""`nucleus eval ...`: evaluation commands. Each lives in a module `nucleus_image.cli.eval_<name>` exposing
`register(subparsers)`."""

from __future__ import annotations

import importlib

EVAL_COMMANDS: tuple[str, ...] = ("compositional", "fid")


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="score models (compositional, FID)")
    eval_sub = parser.add_subparsers(dest="eval_command", required=True)
    for name in EVAL_COMMANDS:
        importlib.import_module(f"nucleus_image.cli.eval_{name}").register(eval_sub)
