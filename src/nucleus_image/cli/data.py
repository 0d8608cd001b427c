"""`nucleus data ...`: dataset commands. Each lives in a module `nucleus_image.cli.data_<name>` exposing
`register(subparsers)`."""

from __future__ import annotations

import importlib

DATA_COMMANDS: tuple[str, ...] = ("curate", "stats", "synth", "encode_captions")


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="synthesize, curate and inspect datasets")
    data_sub = parser.add_subparsers(dest="data_command", required=True)
    for name in DATA_COMMANDS:
        importlib.import_module(f"nucleus_image.cli.data_{name}").register(data_sub)
