"""Small helpers the server benchmarks share (run as scripts: `bench/` is on sys.path). Servers are started
with server/process.py's ServerProcess, the same helper the tests use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from server.process import ServerProcess


def pct(values: Sequence[float], q: float) -> float:
    a = np.asarray(values, dtype=np.float64)
    return float(np.percentile(a, q)) if a.size else float("nan")


ROOT = Path(__file__).resolve().parents[1]


def shown_command(server: ServerProcess) -> str:
    """What a bench ran, for its report: the serve command line and the environment it added."""
    env = " ".join(f"{k}={v}" for k, v in server.env.items())
    return f"vita-duplex {' '.join(server.cmd[3:])}" + (f"  (env {env})" if env else "")
