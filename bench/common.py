"""Small helpers the server benchmarks share (run as scripts: `bench/` is on sys.path)."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def pct(values: Sequence[float], q: float) -> float:
    a = np.asarray(values, dtype=np.float64)
    return float(np.percentile(a, q)) if a.size else float("nan")


ROOT = Path(__file__).resolve().parents[1]


class ServeProcess:
    """`vita-duplex serve` on a free port with a tiny model on CPU, two engines and no TTS; its output goes
    to ``log_path``. ``cmd`` and ``env_extra`` are printed by the benches so every run says what it ran."""

    def __init__(self, model: Path, log_path: Path, env_extra: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [str(ROOT / ".venv/bin/vita-duplex"), "serve", "--model", str(model), "--device", "cpu",
                    "--kv-cache-mib", "64", "--tts", "none", "--port", str(self.port)]
        self.env_extra = env_extra
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **env_extra}, cwd=ROOT)

    async def wait_ready(self, timeout: float = 400.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()[-3000:]}")
            if await asyncio.to_thread(http_ok, self.url + "/ready"):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready")
            await asyncio.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
