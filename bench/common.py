"""Small helpers the server benchmarks share (run as scripts: `bench/` is on sys.path)."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Sequence

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
