"""Bad invocations of the real `nucleus` command: exit code 2, one line on stderr that names the subcommand and
the flag as typed, no traceback, and nothing loaded or written first. Also --version, bare `nucleus`, and the
defaults and examples every --help shows."""

import re

import pytest
from cli_helpers import Nucleus
from generation_fixtures import tiny_own_pipeline


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_errors")
    tiny_own_pipeline().save_pretrained(root / "model")
    (root / "a_file").write_text("not a folder\n")
    (root / "latin1.txt").write_bytes("a red cube\nun c\xf4ne bleu\n".encode("latin-1"))
    (root / "bad.jsonl").write_text('{"prompt": "a red cube"}\n{"prompt": \n')
    (root / "plain.txt").write_text("a red cube\n")
    (root / "empty").mkdir()
    (root / "run").mkdir()
    nucleus = Nucleus(root)
    yield root, nucleus
    nucleus.close()


BAD = [
    # (arguments, with {root} for the fixture folder; the subcommand as printed; text the message must hold)
    (
        "generate --model {root}/model --prompt x --num-images 100000000 --out {root}/o",
        "nucleus generate",
        "--num-images 100000000",
    ),
    ("generate --model {root}/model --prompt x --device cuda --out {root}/o", "nucleus generate", "--device cuda"),
    ("generate --model {root}/model --prompt x --device tpu9 --out {root}/o", "nucleus generate", "--device 'tpu9'"),
    ("generate --model {root}/model --prompt x --out {root}/a_file", "nucleus generate", "--out"),
    (
        "generate --model {root}/model --prompts {root}/latin1.txt --out {root}/o",
        "nucleus generate",
        "--prompts {root}/latin1.txt:2: not UTF-8",
    ),
    (
        "generate --model {root}/model --prompts {root}/bad.jsonl --out {root}/o",
        "nucleus generate",
        "--prompts {root}/bad.jsonl:2: not JSON",
    ),
    ("generate --model {root}/model --prompts {root}/missing.txt --out {root}/o", "nucleus generate", "--prompts"),
    ("generate --model {root}/model --out {root}/o", "nucleus generate", "--prompt"),
    ("generate --model {root}/model --prompt x --steps 0 --out {root}/o", "nucleus generate", "--steps"),
    ("generate --model {root}/model --prompt x --guidance nan --out {root}/o", "nucleus generate", "--guidance"),
    ("generate --model {root}/model --prompt x --width 30 --height 32 --out {root}/o", "nucleus generate", "width 30"),
    ("generate --model {root}/model --prompt x --steps many --out {root}/o", "nucleus generate", "--steps"),
    ("generate --model {root}/empty --prompt x --out {root}/o", "nucleus generate", "is not a pipeline folder"),
    ("train --data {root}/empty --out {root}/run --resume", "nucleus train", "--resume"),
    ("train --data {root}/empty --out {root}/fresh --max-steps 0", "nucleus train", "--max-steps"),
    ("train --data {root}/empty --out {root}/fresh --preset huge", "nucleus train", "--preset 'huge'"),
    ("train --data {root}/empty --out {root}/fresh", "nucleus train", "holds no manifest"),
    ("data synth --out {root}/synth --num 0", "nucleus data synth", "--num"),
    ("data curate {root}/empty --out {root}/curated --quiet", "nucleus data curate", "no images in"),
    ("model info --preset huge", "nucleus model info", "--preset 'huge'"),
    ("model init --out {root}/init --dtype fp32", "nucleus model init", "--dtype"),
    (
        "eval compositional --model {root}/model --prompts {root}/plain.txt --out {root}/ev",
        "nucleus eval compositional",
        "--prompts",
    ),
    (
        "eval compositional --images {root}/o --out {root}/ev --batch-size 0",
        "nucleus eval compositional",
        "--batch-size",
    ),
    (
        "eval fid --images {root}/empty --reference {root}/missing --out {root}/fid.json",
        "nucleus eval fid",
        "--reference",
    ),
    (
        "eval fid --model {root}/model --reference {root}/empty --out {root}/f --device cuda",
        "nucleus eval fid",
        "--device cuda",
    ),
    ("inspect-routing --model {root}/model --out {root}/r --sigmas 2", "nucleus inspect-routing", "--sigmas '2'"),
    ("inspect-routing --model {root}/model --out {root}/a_file", "nucleus inspect-routing", "--out"),
    ("eval compositional --model {root}/model --out {root}/a_file", "nucleus eval compositional", "--out"),
    ("merge {root}/empty --out {root}/m", "nucleus merge", "not a training run folder"),
    ("bench geneval --model {root}/model --out {root}/g --steps 0", "nucleus bench geneval", "--steps"),
    (
        "train --data {root}/empty --out {root}/fresh --set parallel.ep=2",
        "nucleus train",
        "--set parallel.ep=2 needs several processes, but this is one: add --nproc N",
    ),
    (
        "train --data {root}/empty --out {root}/fresh --set lr=1e-3 warmup_steps=2",
        "nucleus train",
        "unrecognized arguments: warmup_steps=2 (--set takes one KEY=VALUE: repeat --set for each)",
    ),
    ("generate --model {root}/model --prompt x --out {root}/o --threads 0", "nucleus generate", "--threads 0"),
    ("plan --gpu-memory 80 --margin 80", "nucleus plan", "--margin 80 GiB"),
]


def test_bad_invocations_exit_2_with_one_line_naming_the_flag(env):
    root, nucleus = env
    failures = []
    for line, command, needle in BAD:
        argv = line.format(root=root).split()
        result = nucleus.run(*argv)
        message = [m for m in result.stderr.splitlines() if m.strip()]
        problems = []
        if result.returncode != 2:
            problems.append(f"exit {result.returncode}")
        if "Traceback" in result.stderr:
            problems.append("traceback")
        if not message or not message[-1].startswith(f"{command}: error:"):
            problems.append(f"last line does not start with {command!r}: error:")
        if needle.format(root=root) not in result.stderr:
            problems.append(f"no {needle.format(root=root)!r}")
        if problems:
            failures.append(f"nucleus {' '.join(argv)}: {', '.join(problems)}\n{result.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert not (root / "o").exists() and not (root / "fresh").exists()  # refused before anything was written


def test_version_bare_command_and_help(env):
    root, nucleus = env
    version = nucleus.run("--version")
    assert version.returncode == 0 and re.fullmatch(r"nucleus-image \d+\.\d+\.\d+\n", version.stdout)
    bare = nucleus.run()
    assert bare.returncode == 0 and "usage: nucleus" in bare.stdout and "generate" in bare.stdout
    for command in (
        ["generate"],
        ["train"],
        ["eval", "compositional"],
        ["eval", "fid"],
        ["data", "synth"],
        ["model", "init"],
        ["merge"],
        ["inspect-routing"],
        ["bench", "geneval"],
        ["ablate", "routing"],
    ):
        text = nucleus.run(*command, "--help").stdout
        assert "examples:\n  nucleus " + " ".join(command) in text, command
        assert "(default: " in text, command
    info = nucleus.run("model", "info", "--preset", "tiny").stdout
    assert re.search(r"parameters: \d+\.\dM total, \d+\.\dM active per token", info), info[-300:]
    generate = nucleus.run("generate", "--help").stdout
    assert "(default: 50)" in generate and "--seed SEED" in generate and "(default: 0)" in generate


def test_inspect_routing_on_plain_prompts_reports_timestep_and_token_metrics(env):
    import json

    root, nucleus = env
    result = nucleus.run(
        "inspect-routing",
        "--model",
        str(root / "model"),
        "--out",
        str(root / "routing"),
        "--prompt",
        "a red circle",
        "--prompt",
        "two blue squares",
        "--steps",
        "2",
        "--sigmas",
        "0.2,0.8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the shape, colour and region columns need scenes" in result.stdout
    assert "var_t / var_tok / var_int:" in result.stdout  # the columns are explained under the table
    summary = json.loads((root / "routing" / "routing.json").read_text())["summary"]
    assert set(summary["nmi"]) == {"timestep"} and 0.0 <= summary["variance_share"]["token"] <= 1.0
    assert summary["jaccard"] > 0.0


def test_every_option_with_a_default_shows_it_in_help():
    """An option whose value is used when it is not given says what that value is (store_true flags, required
    options and inputs that are alternatives to each other have none)."""
    import argparse

    from nucleus_image.cli import build_parser

    def parsers(parser, name="nucleus"):
        yield name, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    yield from parsers(sub, f"{name} {sub_name}")

    missing = []
    for name, parser in parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if (
                not action.option_strings
                or action.required
                or action.default in (None, False, [])
                or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
            ):
                continue
            text = formatter._expand_help(action) if action.help else ""
            if "default" not in text:
                missing.append(f"{name} {action.option_strings[0]} (default {action.default!r})")
    assert not missing, missing
