"""`ember serve` as a real process on a free port, for the e2e tests: started with extra
environment, waited on until a path answers 200 (failing early with the log if it exits),
stopped with SIGTERM (or found already killed) on the way out."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

STARTUP_LIMIT_S = 420  # the first start on a fresh machine de-quantizes the GGUF (~20-60 s)
REPO = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def ember_serve(
    log_path: Path, env: dict[str, str], *, wait_for: str | None = "/ready",
    startup_s: float = STARTUP_LIMIT_S,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`wait_for=None` yields at once, before the server answers anything (start-up tests)."""
    port = free_port()
    with log_path.open("a") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "ember.cli", "serve", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=REPO,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while wait_for is not None:
            assert process.poll() is None, f"server exited:\n{log_path.read_text()[-3000:]}"
            try:
                if httpx.get(f"{base}{wait_for}", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready:\n{log_path.read_text()[-3000:]}"
            time.sleep(0.2)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
