"""Test-wide settings: the text-state cache (shared across runs by design) lives in one temporary folder per test
session, never in the user's ~/.cache; subprocesses inherit it through the environment. Triton kernels run in
Triton's interpreter on CPU tensors (TRITON_INTERPRET is read when a kernel module is imported, so it is set here,
before any test imports one)."""

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _private_text_state_cache(tmp_path_factory):
    previous = os.environ.get("NUCLEUS_CACHE")
    os.environ["NUCLEUS_CACHE"] = str(tmp_path_factory.mktemp("nucleus-cache"))
    yield
    if previous is None:
        os.environ.pop("NUCLEUS_CACHE", None)
    else:
        os.environ["NUCLEUS_CACHE"] = previous
