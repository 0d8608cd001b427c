"""Every `nucleus ...` command in README.md and docs/*.md goes through the real argument parser, so the documents
cannot drift from the command line. Commands in code blocks (with `\\` continuations, trailing `# comments`,
`torchrun ... -m nucleus_image ...`) must parse completely, required arguments included; commands in inline code
must name a real subcommand and only its flags, with valid values (they may leave out required ones).
Placeholders such as DIR, RUN or N stand for values: an upper-case word given to a number flag is read as 1."""

import argparse
import functools
import re
import shlex
from pathlib import Path

import pytest

from nucleus_image.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")


class ParseError(Exception):
    pass


@functools.cache
def strict_parser(lenient: bool) -> argparse.ArgumentParser:
    """The real parser, raising instead of exiting; built once per mode (parsing does not change it)."""
    parser = build_parser()
    for sub in parsers(parser):
        sub.exit_on_error = False

        def fail(message, sub=sub):
            raise ParseError(f"{sub.prog}: {message}")

        sub.error = fail
        if lenient:
            for action in sub._actions:
                action.required = False
    return parser


def parsers(parser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from parsers(sub)


def leaf(parser, words):
    """The parser of the subcommand the words name (following subcommand choices)."""
    for word in words:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and word in action.choices:
                parser = action.choices[word]
                break
    return parser


def fill_placeholders(parser, words: list[str]) -> list[str]:
    """A placeholder given to an int/float option becomes 1 (DIR, FILE, RUN stay: they are strings)."""
    options = {s: a for a in leaf(parser, words)._actions for s in a.option_strings}
    out = []
    for k, word in enumerate(words):
        action = options.get(words[k - 1]) if k else None
        if PLACEHOLDER.match(word) and action is not None and action.type in (int, float):
            word = "1"
        out.append(word)
    return out


def code_block_commands(text: str) -> list[str]:
    commands = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.strip()
            if "-m nucleus_image " in line and line.startswith("torchrun"):
                line = "nucleus " + line.split("-m nucleus_image ", 1)[1]
            if line.startswith("nucleus ") or line == "nucleus":
                commands.append(line)
    return commands


def inline_commands(text: str) -> list[str]:
    outside_blocks = re.sub(r"```.*?```", "", text, flags=re.S)
    spans = re.findall(r"`(nucleus [^`]+)`", outside_blocks)
    return [" ".join(span.split()) for span in spans]


def words_of(command: str) -> list[str]:
    """The arguments after `nucleus`: [optional parts] included, `...` ends them, --help checks the path only."""
    words = [w for w in (w.strip("[]") for w in shlex.split(command, comments=True)[1:]) if w]
    if "..." in words:  # "the rest as before"
        words = words[: words.index("...")]
    return [w for w in words if w not in ("--help", "-h")]


def check(command: str, lenient: bool) -> None:
    parser = strict_parser(lenient)
    words = fill_placeholders(parser, words_of(command))
    if not words:
        return
    try:
        args, extra = parser.parse_known_args(words)
    except (ParseError, argparse.ArgumentError) as err:
        raise ParseError(str(err)) from None
    if extra:
        raise ParseError(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None and words[0] != "--version":
        raise ParseError("no subcommand")


def test_the_documents_exist_and_hold_commands():
    assert (ROOT / "docs").is_dir() and len(DOCUMENTS) >= 10
    assert len(ROOT.joinpath("README.md").read_text().splitlines()) <= 200
    blocks = [c for doc in DOCUMENTS for c in code_block_commands(doc.read_text())]
    assert len(blocks) >= 40, blocks


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_every_documented_command_parses(document):
    text = document.read_text()
    failures = []
    for lenient, commands in ((False, code_block_commands(text)), (True, inline_commands(text))):
        for command in commands:
            try:
                check(command, lenient)
            except ParseError as err:
                failures.append(f"{command!r}: {err}")
    assert not failures, f"{document.name}:\n" + "\n".join(failures)


def test_the_checker_catches_drift():
    with pytest.raises(ParseError, match="unrecognized arguments: --frobnicate"):
        check("nucleus generate --model M --prompt x --out O --frobnicate", lenient=False)
    with pytest.raises(ParseError, match="required"):
        check("nucleus generate --prompt x", lenient=False)
    check("nucleus generate --prompt x", lenient=True)
    with pytest.raises(ParseError, match="invalid choice"):
        check("nucleus generate --model M --out O --prompt x --cache nope", lenient=True)
    with pytest.raises(ParseError, match="invalid int value"):
        check("nucleus train --data D --out O --max-steps many", lenient=False)
    check("nucleus train --data DIR --out RUN --max-steps N", lenient=False)
    block = "```bash\ntorchrun --nnodes 2 \\\n    -m nucleus_image train --data D --out O   # a comment\n```\n"
    assert code_block_commands(block) == ["nucleus train --data D --out O   # a comment"]
