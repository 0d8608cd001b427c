"""The `nucleus` command. Each subcommand lives in its own module here and exposes `register(subparsers)`; the
indented `nucleus ...` lines of a module's docstring become the examples at the end of that subcommand's --help.

    nucleus --help
    nucleus generate --help
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import textwrap

import nucleus_image
from nucleus_image.progress import is_terminal
from nucleus_image.threads import check_threads, prepare_process, threads_for_command

# Modules under nucleus_image.cli, each adding one top-level subcommand.
COMMANDS = (
    "model",
    "data",
    "eval",
    "generate",
    "train",
    "finetune",
    "distill",
    "merge",
    "inspect_routing",
    "ablate",
    "bench",
    "plan",
    "serve",
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and shows every default that is not already spelled out in the help."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = (
            action.default is None
            or action.default is False
            or action.default == []
            or action.default == argparse.SUPPRESS
        )
        if unset or "default" in text or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _examples(parser: argparse.ArgumentParser, docs: list[str]) -> str | None:
    lines = [line.strip() for doc in docs for line in doc.splitlines()]
    picked = [line for line in lines if line.startswith(parser.prog + " ")]
    return "examples:\n" + "\n".join(f"  {line}" for line in dict.fromkeys(picked)) if picked else None


def _finish(parser: argparse.ArgumentParser, docs: list[str]) -> None:
    """Every parser of the tree: the shared formatter, and the examples for its own command."""
    parser.formatter_class = HelpFormatter
    if parser.description and "\n" not in parser.description:
        parser.description = textwrap.fill(parser.description, 100)
    if parser.epilog is None:
        parser.epilog = _examples(parser, docs)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _finish(sub, docs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nucleus", description="Nucleus-Image: sparse-MoE text-to-image diffusion")
    parser.add_argument("--version", action="version", version=f"nucleus-image {nucleus_image.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = [importlib.import_module(f"nucleus_image.cli.{name}") for name in COMMANDS]
    for module in modules:
        module.register(subparsers)
    docs = [
        m.__doc__ or ""
        for m in sys.modules.values()
        if m is not None and getattr(m, "__name__", "").startswith("nucleus_image.cli.")
    ]
    _finish(parser, docs)
    return parser


def _leaf_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the (sub)subcommand `args` came from."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _leaf_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def command_name(args) -> str:
    """The subcommand as typed, e.g. `nucleus eval fid`, for error messages."""
    words = [args.command.replace("_", "-")]
    for key in ("data_command", "eval_command", "model_command", "ablate_command", "bench_command"):
        if getattr(args, key, None):
            words.append(getattr(args, key))
    return "nucleus " + " ".join(words)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    prepare_process()  # before build_parser imports torch
    if not is_terminal(sys.stderr):
        # Hugging Face libraries' own bars (loading weights, downloads) are carriage-return bars too.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Reported by the subcommand's parser, so the usage and the error name the command that was typed.
        hint = (
            " (--set takes one KEY=VALUE: repeat --set for each)"
            if any("=" in e and not e.startswith("-") for e in extra)
            else ""
        )
        _leaf_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    if args.command is None:
        parser.print_help()
        return 0
    args.argv = argv
    name = command_name(args)
    # SIGTERM (a job scheduler, `kill`) stops a command the way Ctrl-C does: no traceback, nothing half-written.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if not hasattr(args, "threads"):
            return int(args.func(args) or 0)
        check_threads(args.threads)
        with threads_for_command(args.threads) as args.threads_used:
            return int(args.func(args) or 0)
    except KeyboardInterrupt as stop:
        print(f"{name}: interrupted" + (f": {stop}" if str(stop) else ""), file=sys.stderr)
        return 130
    except (ValueError, OSError) as err:
        # Bad input is reported in one line that names the value; tracebacks are for bugs.
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
