"""What the endpoints share (engines, VAD, metrics, admission), in its own module: app.py builds it and
mounts the routers, and the routers (chat, realtime) read it, so none of them imports app.py."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from duplex.runtime import VadHub
from duplex.transcription import NoTranscription, Transcriber
from duplex.tts import TextToSpeech

from .engines import EnginePool
from .metrics import Metrics
from .settings import ServerSettings

T = TypeVar("T")


@dataclass
class AppState:
    """Everything the endpoints share. Per-session state lives in each session, never here."""

    settings: ServerSettings
    pool: EnginePool
    vad: VadHub
    metrics: Metrics
    tts_factory: Callable[[], TextToSpeech]
    # Input transcription, shared by every session (it holds the worker processes or the HTTP pool).
    transcriber: Transcriber = field(default_factory=NoTranscription)
    active: int = 0
    startup_error: str | None = None
    shutting_down: bool = False
    connections: set[Any] = field(default_factory=set)  # live realtime connections
    # Realtime connections and chat requests that have ended and are still in memory: each should be freed
    # when it ends; one kept (by a reference cycle, until the interpreter's rare full collection, or by a
    # leak, for good) keeps its audio, images and items with it. On /metrics: vita_*_ended_in_memory.
    ended_sessions: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    ended_requests: weakref.WeakSet[Any] = field(default_factory=weakref.WeakSet)
    background: set[Any] = field(default_factory=set)  # tasks that must outlive their session (socket closes)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _freed: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever a slot is released
    # Blocking work (decoding, resampling, long VAD runs, long tokenizations) runs here, never on the event
    # loop; `blocking_threads` bounds it, so a flood of big inputs queues instead of taking every core.
    executor: ThreadPoolExecutor | None = None

    def __post_init__(self) -> None:
        if self.executor is None:
            self.executor = ThreadPoolExecutor(self.settings.blocking_threads, thread_name_prefix="vita-blocking")

    async def offload(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` in the bounded executor; the event loop serves everyone else meanwhile."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def try_admit(self) -> bool:
        if self.active >= self.settings.max_sessions:
            self.metrics.sessions_rejected.inc()
            return False
        self.active += 1
        return True

    async def admit(self, grace_s: float) -> bool:
        """`try_admit`, but at capacity first wait up to `grace_s` for a slot being freed: a client that
        closes and reconnects at once gets in even when the server has not yet seen its old socket go."""
        deadline = asyncio.get_running_loop().time() + grace_s
        while self.active >= self.settings.max_sessions:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            self._freed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._freed.wait()
        return self.try_admit()

    def release(self) -> None:
        self.active = max(0, self.active - 1)
        self._freed.set()
