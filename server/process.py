"""A real `vita-duplex serve` subprocess on a free loopback port: the one helper tests and benches start
servers with (and operators' scripts may), so that every caller waits, logs and stops it the same way."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Self

READY_TIMEOUT_S = 400.0  # a cold CPU start builds two vLLM engines; under a busy test run that takes minutes
STOP_GRACE_S = 30.0  # SIGTERM first: sessions are closed with 1001 and engines shut down, then SIGKILL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`vita-duplex serve --model MODEL --device cpu --kv-cache-mib 64 ARGS…` on a free port.

    `url` is its http:// base URL; its output goes to `log_path` (given a directory: `server.log` in it);
    `cmd` and `env` say what ran, for a bench to print. `model=None` serves the embedded demo."""

    def __init__(self, model: Path | None, log_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path / "server.log" if log_path.is_dir() else log_path
        self.cmd = [sys.executable, "-m", "clients.cli", "serve", *(["--model", str(model)] if model else []),
                    "--port", str(self.port), "--device", "cpu", "--kv-cache-mib", "64", *args]
        self.env = dict(env or {})
        with open(self.log_path, "w") as log_file:
            self.proc = subprocess.Popen(self.cmd, stdout=log_file, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env})

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until /ready answers 200; raises with the log's tail if the process exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.log()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in {timeout:.0f} s:\n{self.log()[-4000:]}")
            time.sleep(0.5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
