"""What the endpoints share (engines, VAD, metrics, admission), in its own module: app.py builds it and
mounts the routers, and the routers (chat, realtime) read it, so none of them imports app.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from duplex.runtime import VadHub
from duplex.tts import TextToSpeech

from .engines import EnginePool
from .metrics import Metrics
from .settings import ServerSettings


@dataclass
class AppState:
    """Everything the endpoints share. Per-session state lives in each session, never here."""

    settings: ServerSettings
    pool: EnginePool
    vad: VadHub
    metrics: Metrics
    tts_factory: Callable[[], TextToSpeech]
    active: int = 0
    startup_error: str | None = None
    shutting_down: bool = False
    connections: set[Any] = field(default_factory=set)  # live realtime connections
    background: set[Any] = field(default_factory=set)  # tasks that must outlive their session (socket closes)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def try_admit(self) -> bool:
        if self.active >= self.settings.max_sessions:
            self.metrics.sessions_rejected.inc()
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active = max(0, self.active - 1)
