"""Test helpers for the duplex controller.

`SimpleChunker` cuts sentences by punctuation alone, so the controller tests can predict every `Speak`
(production uses `duplex.sentences.SentenceChunker`, which also waits for the next word, cuts the first
chunk at clauses and knows abbreviations). `DuplexController` here is the production controller with
that chunker as its default and a few read-only views that only tests need; the policy is the same.
"""

from __future__ import annotations

from collections.abc import Callable

from duplex import controller
from duplex.events import Role


class SimpleChunker:
    """Cut after . ! ? followed by whitespace, and after newlines and CJK 。！？."""

    _HARD = "\n。！？"
    _SOFT = ".!?"

    def __init__(self) -> None:
        self._buffer = ""

    def push(self, delta: str) -> list[str]:
        self._buffer += delta
        out: list[str] = []
        start = 0
        buf = self._buffer
        for i, ch in enumerate(buf):
            if ch in self._HARD or (ch in self._SOFT and i + 1 < len(buf) and buf[i + 1].isspace()):
                out.append(buf[start : i + 1])
                start = i + 1
        self._buffer = buf[start:]
        return [s.strip() for s in out if s.strip()]

    def flush(self) -> list[str]:
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if rest else []


class DuplexController(controller.DuplexController):
    """`duplex.controller.DuplexController` with `SimpleChunker` as the default chunker, and views."""

    def __init__(
        self,
        settings: controller.ControllerSettings | None = None,
        *,
        session_id: str = "s",
        chunker_factory: Callable[[], controller.Chunker] = SimpleChunker,
    ) -> None:
        super().__init__(settings, session_id=session_id, chunker_factory=chunker_factory)

    @property
    def generator(self) -> int:
        return self._generator

    @property
    def monitor(self) -> int:
        return self._monitor

    @property
    def current_response_id(self) -> str | None:
        return None if self._current is None else self._current.response_id

    @property
    def output_held(self) -> bool:
        return self.output in (controller.Output.HELD, controller.Output.PAUSED)

    def live_requests(self) -> dict[str, Role]:
        """Requests started and neither ended nor aborted, with their current role."""
        return {rid: "probe" if r.response is None else "answer" for rid, r in self._requests.items()}
