"""Running the `nucleus` command many times without paying Python's and torch's import each time: one process
imports the CLI once, then forks a fresh child per invocation that runs `main(argv)` exactly as the installed
entry point does (`sys.exit(main())`: an uncaught exception prints its traceback and exits 1), with its own stdout,
stderr, exit code and signal handlers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ZYGOTE = r"""
import json, os, sys, traceback
from nucleus_image.cli import build_parser, main
# What the subcommands import lazily, imported once here so each forked child starts warm.
import torch, nucleus_image.pipeline, nucleus_image.training.trainer, nucleus_image.data.curate
import nucleus_image.eval.compositional
build_parser()
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        try:
            code = main(job["argv"])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(os.waitstatus_to_exitcode(status)), flush=True)
"""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


class Nucleus:
    """`Nucleus(tmp).run("generate", "--steps", "0", ...)` -> Result."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.count = 0
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
        self.process = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def run(self, *argv: str) -> Result:
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        job = {"argv": list(argv), "stdout": str(out), "stderr": str(err)}
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        code = json.loads(self.process.stdout.readline())
        return Result(code, out.read_text(), err.read_text())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
