"""A real `nucleus serve` process on 127.0.0.1 and a free port, for the API and browser tests and the benchmark."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from training_helpers import cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(base: str, path: str, body=None, method: str | None = None, timeout: float = 120):
    """(status, headers, parsed JSON or raw bytes) of one request; `body` is sent as JSON unless it is bytes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as err:
        status, headers, raw = err.code, err.headers, err.read()
    is_json = headers.get("content-type", "").startswith("application/json")
    return status, headers, json.loads(raw) if is_json else raw


@contextmanager
def running_server(model_dir, *args: str, startup_timeout: float = 120):
    """Start `nucleus serve --model model_dir ARGS`, wait until /health answers, yield (base URL, process);
    SIGTERM and wait on exit. The server's output goes to a temporary log, quoted when it fails to start."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    # The server holds its own copy of the log's descriptor; ours closes at once.
    with tempfile.NamedTemporaryFile("w", prefix=f"nucleus-serve-{port}-", suffix=".log", delete=False) as log:
        log_path = Path(log.name)
        process = subprocess.Popen(
            cli(
                "serve",
                "--model",
                str(model_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
                *args,
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}: {log_path.read_text()[-3000:]}")
            try:
                if call(base, "/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not answer within {startup_timeout} s: {log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log_path.unlink()
