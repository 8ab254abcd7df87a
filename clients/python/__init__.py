"""Python client for vita-duplex: `RealtimeClient` over `WS /v1/realtime`, and the `talk` / `ask` commands.

Names are loaded on first use, so `vita-duplex`'s other commands (which import `clients.python.cli` to build
their parser) do not pay for websockets, numpy and pydantic.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .realtime import (
        AuthenticationFailed,
        ConnectFailed,
        ConnectionLost,
        RealtimeClient,
        RealtimeError,
        ServerError,
        ServerEvent,
        ServerUnavailable,
        realtime_url,
    )

__all__ = [
    "AuthenticationFailed",
    "ConnectFailed",
    "ConnectionLost",
    "RealtimeClient",
    "RealtimeError",
    "ServerError",
    "ServerEvent",
    "ServerUnavailable",
    "realtime_url",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".realtime", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
