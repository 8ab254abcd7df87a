"""FastAPI app factory: engines in the background, health/readiness/metrics, the OpenAI-style APIs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from openai.types import Model

from duplex.runtime import VadHub
from duplex.tts import TextOnlyTTS, TextToSpeech

from .auth import bearer_token, key_matches, origin_allowed
from .engines import EnginePool
from .metrics import Metrics
from .settings import ServerSettings
from .state import AppState

log = logging.getLogger(__name__)


def make_tts_factory(settings: ServerSettings) -> Callable[[], TextToSpeech]:
    if settings.tts == "none":
        return TextOnlyTTS
    if settings.tts == "http":
        from duplex.tts_http import OpenAISpeechTTS

        if not settings.tts_url:
            raise ValueError("tts=http needs tts_url (an OpenAI-compatible server's base URL)")
        url, model, voice = settings.tts_url, settings.tts_model, settings.tts_voice
        return lambda: OpenAISpeechTTS(url, model=model, voice=voice)
    try:
        from duplex.tts import EspeakTTS

        EspeakTTS().synthesize_blocking("ok")
        return EspeakTTS
    except Exception as exc:  # noqa: BLE001 - the GPL voice is an optional extra: any failure means "not here"
        log.warning("espeak voice unavailable (%s); speech output is text only", exc)
        return TextOnlyTTS


def resolve_models(settings: ServerSettings) -> list[str]:
    if settings.models:
        return list(settings.models)
    from models.embedded import demo_checkpoint

    log.warning(
        "no model given: serving the embedded DEMO model (SmolLM2-135M-Instruct in the VITA layout, random "
        "vision/audio towers). Typed questions get real answers; spoken/visual input is not understood."
    )
    return [str(demo_checkpoint())]


def _install_task_dump() -> bool:
    """`kill -USR1 <pid>` logs every asyncio task's stack: what a hung session is waiting on, which
    faulthandler (threads only) cannot show. Only where signals can be handled (the main thread)."""
    loop = asyncio.get_running_loop()

    def dump() -> None:
        for task in asyncio.all_tasks(loop):
            stack = io.StringIO()
            task.print_stack(file=stack)
            log.warning("task %s:\n%s", task.get_name(), stack.getvalue())

    try:
        loop.add_signal_handler(signal.SIGUSR1, dump)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no signals here
        return False
    return True


def create_app(settings: ServerSettings) -> FastAPI:
    pool = EnginePool(settings, [])
    state = AppState(
        settings=settings,
        pool=pool,
        vad=VadHub(),
        metrics=Metrics(in_flight=lambda: float(pool.requests_in_flight())),
        tts_factory=make_tts_factory(settings),
    )

    async def start_engines() -> None:
        try:
            pool.model_dirs = await asyncio.to_thread(resolve_models, settings)
            await pool.start()
            log.info("ready: %d engine(s) on %s", len(pool.engines), ", ".join(pool.model_dirs))
            await pool.watch()
        except Exception as exc:
            state.startup_error = f"{type(exc).__name__}: {exc}"
            log.exception("engines failed to start")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Engines load in the background so /health answers at once and /ready says when to route.
        task = asyncio.create_task(start_engines())
        dumping = _install_task_dump()
        yield
        if dumping:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await pool.shutdown()

    app = FastAPI(title="vita-duplex", version="0.1.0", lifespan=lifespan)
    app.state.vita = state

    app.add_middleware(GuardMiddleware, settings=settings)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if state.pool.ready and not state.shutting_down:
            return JSONResponse({"status": "ready", "engines": len(state.pool.engines)})
        status = "shutting_down" if state.shutting_down else "failed" if state.startup_error else (
            "restarting" if state.pool.engines else "loading"
        )
        # /ready is open to anyone who can reach the port: name the failure, keep its text (paths,
        # devices) for the log and for key-holders (chat's 503 detail).
        error = state.startup_error and f"{state.startup_error.split(':', 1)[0]}; see the server log"
        body = {"status": status, "error": error}
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    # OpenAI's Model requires `created`. When a checkpoint was made is unknowable here, so it is when this
    # server started serving it (vLLM puts the time of each request: a list that changes on every call).
    serving_since = int(time.time())

    @app.get("/v1/models")
    async def list_models() -> dict:
        model = Model(id=state.pool.model_id, created=serving_since, object="model", owned_by="vita-duplex")
        return {"object": "list", "data": [model.model_dump()]}

    from .chat import router as chat_router
    from .realtime import router as realtime_router
    from .web import router as web_router

    app.include_router(chat_router)
    app.include_router(realtime_router)
    app.include_router(web_router)
    _document_bodies(app)
    return app


def _document_bodies(app: FastAPI) -> None:
    from .chat import document_request_body

    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_request_body(generate())  # generate() caches its result in app.openapi_schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class GuardMiddleware:
    """API keys on `/v1/*` and the Origin allow-list for HTTP, as plain ASGI (a `BaseHTTPMiddleware`
    would hide client disconnects from streaming endpoints). WebSockets check both in their handler,
    where they can answer with a close code."""

    def __init__(self, app: Any, settings: ServerSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            refusal = None
            needs_key = scope["path"].startswith("/v1/") and bool(self.settings.api_keys)
            if needs_key and not key_matches(bearer_token(headers.get("authorization")), self.settings.api_keys):
                refusal = _error(401, "invalid_api_key", "missing or invalid API key (Authorization: Bearer <key>)")
            if refusal is None and not origin_allowed(headers.get("origin"), self.settings.allowed_origins):
                refusal = _error(403, "origin_not_allowed", "this Origin is not in the server's allow-list")
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def close_all_sessions(state: AppState, reason: str = "server shutting down", timeout_s: float = 5.0) -> None:
    """Tell every realtime client why it is being disconnected (close 1001 with a reason)."""
    state.shutting_down = True
    closing = [conn.close(1001, reason) for conn in list(state.connections)]
    if closing:
        await asyncio.wait([asyncio.ensure_future(c) for c in closing], timeout=timeout_s)


def _error(status: int, code: str, message: str, param: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status
    )
