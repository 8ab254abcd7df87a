"""`vita-duplex serve`: the server process (uvicorn with a graceful shutdown that closes realtime sessions first).

The command line lives in `clients/cli.py` (the user's side); this is what it calls.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any


def serve(cli: dict[str, Any], config_file: Path | None = None) -> int:
    """Run the server until SIGTERM/SIGINT: settings from CLI values > VITA_* env > `config_file` > defaults."""
    import uvicorn
    from pydantic import ValidationError
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from .app import create_app
    from .connections import MAX_HEAD_BYTES, header_timeout_protocol
    from .logs import configure_logging
    from .settings import load_settings
    from .ws_protocol import ParsedByWebsocketsProtocol, ReadAheadWebSocketProtocol

    try:
        settings = load_settings(cli, config_file)
    except (ValidationError, OSError, ValueError) as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    _return_large_blocks()
    try:
        app = create_app(settings)
    except ValueError as exc:  # settings that cannot work together (tts=vita without the voice, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # ours also parses the common text frame itself (server/ws_protocol.py), unless "wsframe" is off
    read_ahead = ParsedByWebsocketsProtocol if "wsframe" in settings.hot_path_off else ReadAheadWebSocketProtocol
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None,
        ws_max_size=2 * settings.max_event_bytes + (1 << 20), timeout_graceful_shutdown=10,
        # Both apply TCP backpressure to sends, so a client that stops reading fills our bounded per-session
        # queue and is closed; ours reads ahead instead of pausing the socket for every event (issue 14).
        ws="websockets" if "ws" in settings.hot_path_off else read_ahead,
        # No permessage-deflate by default: inflating a client's message runs on the event loop (a 3.5 MB append
        # took 0.2 s there, stalling every session), and base64 audio and images hardly compress anyway; the
        # setting exists so bench/load.py can measure both (issue 14).
        ws_per_message_deflate=settings.ws_per_message_deflate,
        # Idle and slow connections are closed (server/connections.py): uvicorn's keep-alive timeout between
        # requests, and our deadline and size cap for the request head before one (uvicorn has neither).
        http=header_timeout_protocol(AutoHTTPProtocol, settings.header_timeout_s),
        timeout_keep_alive=settings.keep_alive_timeout_s, h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
    _GracefulServer(config, app.state.vita).run()
    return 0


class _GracefulServer:
    """uvicorn.Server that, on SIGTERM/SIGINT, first closes every realtime session with a reason
    (close 1001 "server shutting down") and only then lets uvicorn stop; a second signal forces it."""

    def __new__(cls, config, state):  # type: ignore[no-untyped-def]
        import uvicorn

        from .app import close_all_sessions

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame: object) -> None:
                if state.shutting_down or self.should_exit:
                    super().handle_exit(sig, frame)
                    return
                import asyncio

                loop = asyncio.get_event_loop()

                async def graceful() -> None:
                    await close_all_sessions(state)
                    self.should_exit = True

                state.shutting_down = True
                tasks = self._graceful = []  # the loop holds tasks only weakly: keep ours
                loop.call_soon_threadsafe(lambda: tasks.append(asyncio.ensure_future(graceful())))

        return Server(config)


def _return_large_blocks(threshold: int = 256 << 10) -> None:
    """Have glibc map every allocation of `threshold` bytes or more on its own and unmap it when freed. By
    default the threshold rises to the largest block freed so far (up to 32 MiB), after which a decoded image
    or clip lands in the heap of whichever executor thread decoded it, and that heap keeps the memory when
    the session ends (main RSS stayed 80 MB up after one session of 16 MP frames). 256 KiB: a kept 448²
    frame (800 KB in PIL) goes back when its session closes too. Elsewhere (not glibc): nothing."""
    import ctypes
    import ctypes.util

    m_mmap_threshold = -3  # <malloc.h>
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(m_mmap_threshold, threshold)
