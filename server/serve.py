"""`vita-duplex serve`: the server process (uvicorn with a graceful shutdown that closes realtime sessions first).

The command line lives in `clients/cli.py` (the user's side); this is what it calls.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def serve(cli: dict[str, Any], config_file: Path | None = None) -> int:
    """Run the server until SIGTERM/SIGINT: settings from CLI values > VITA_* env > `config_file` > defaults."""
    import uvicorn
    from pydantic import ValidationError

    from .app import create_app
    from .logs import configure_logging
    from .settings import load_settings

    try:
        settings = load_settings(cli, config_file)
    except (ValidationError, OSError, ValueError) as exc:
        print(f"error: invalid settings: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None,
        ws_max_size=2 * settings.max_event_bytes + (1 << 20), timeout_graceful_shutdown=10,
        # The "websockets" protocol applies TCP backpressure to sends (the sans-I/O one buffers without
        # bound), so a client that stops reading fills our bounded per-session queue and is closed.
        ws="websockets",
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
