"""The house rules, checked by the tools that own them: the import layers (import-linter, contracts in
pyproject.toml), lint (ruff) and types (mypy on the public API). Each runs as its own process from this
environment, as a developer would run it."""

import subprocess
import sys
from pathlib import Path

from importlinter.api import read_configuration

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(tool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool), *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_imports_follow_the_layers_with_no_exceptions(monkeypatch):
    monkeypatch.chdir(ROOT)  # the configuration is read from ./pyproject.toml
    contracts = read_configuration()["contracts_options"]
    assert {c["type"] for c in contracts} >= {"layers", "acyclic_siblings"}
    assert not [c["id"] for c in contracts if c.get("ignore_imports")], "contracts must hold without exceptions"
    result = run("lint-imports")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_ruff_lint_is_clean():
    result = run("ruff", "check", "--no-cache", "src", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api_type_checks():
    """mypy on nucleus_image.model, nucleus_image.pipeline and nucleus_image.training.config (the files and
    settings are in pyproject.toml; its cache lives in .mypy_cache, so a warm run takes seconds)."""
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success: no issues found")


def test_ruff_format_is_clean():
    """The tree stays as `ruff format src tests benchmarks` leaves it (settings in pyproject.toml)."""
    result = run("ruff", "format", "--check", "--no-cache", "src", "tests", "benchmarks")
    assert result.returncode == 0, result.stdout + result.stderr
