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
from duplex.transcription import NoTranscription, Transcriber
from duplex.tts import TextOnlyTTS, TextToSpeech
from models.config import hears

from .auth import bearer_token, key_matches, origin_allowed
from .connections import BodyDeadlineMiddleware
from .engines import EnginePool, missing_voice
from .metrics import Metrics
from .settings import ServerSettings
from .state import AppState

log = logging.getLogger(__name__)


def make_tts_factory(settings: ServerSettings, pool: EnginePool) -> Callable[[], TextToSpeech]:
    """Each session's voice (and each spoken chat reply's). The vita voice is one engine that the pool starts
    beside the LLM engines (sessions are admitted only once it runs); each call gets its own `VitaTTS` over it,
    so the sessions' decoder steps batch in that engine."""
    if settings.tts == "none":
        return TextOnlyTTS
    if settings.tts == "http":
        from duplex.tts_http import OpenAISpeechTTS

        if not settings.tts_url:
            raise ValueError("tts=http needs tts_url (an OpenAI-compatible server's base URL)")
        url, model, voice = settings.tts_url, settings.tts_model, settings.tts_voice
        return lambda: OpenAISpeechTTS(url, model=model, voice=voice)
    if settings.tts == "vita":
        _require_local_voice(settings)
        return lambda: _vita_session(pool)
    espeak = _espeak_or_text()
    if settings.tts == "espeak":
        return espeak

    def auto() -> TextToSpeech:  # the checkpoint's own voice when the pool started one (it ships vita_tts_ckpt/)
        return pool.voice.session() if pool.voice is not None else espeak()

    return auto


def _espeak_or_text() -> Callable[[], TextToSpeech]:
    try:
        from duplex.tts import EspeakTTS

        EspeakTTS().synthesize_blocking("ok")
        return EspeakTTS
    except Exception as exc:  # noqa: BLE001 - the GPL voice is an optional extra: any failure means "not here"
        log.warning("espeak voice unavailable (%s); speech output is text only", exc)
        return TextOnlyTTS


def _vita_session(pool: EnginePool) -> TextToSpeech:
    if pool.voice is None:
        raise RuntimeError("the vita voice is not running yet (engines loading) or failed to start")
    return pool.voice.session()


def _require_local_voice(settings: ServerSettings) -> None:
    """tts=vita fails at once for checkpoints on disk without the voice (and for the embedded demo, which has
    none); a hub id is checked when the pool resolves it (a startup error on /ready and in the log)."""
    from pathlib import Path

    from duplex.tts_vita import has_vita_voice
    from models.checkpoint import CheckpointError, resolve_model_dir

    spec = settings.models[0] if settings.models else None
    if spec is None:
        raise ValueError(missing_voice("the embedded demo model (no --model)"))
    if not Path(spec).expanduser().exists():
        return
    try:
        model_dir = resolve_model_dir(spec)
    except CheckpointError:
        return  # the engines report what is wrong with it
    if not has_vita_voice(model_dir):
        raise ValueError(missing_voice(spec))


def make_transcriber(settings: ServerSettings) -> Transcriber:
    """The server's one input transcriber, shared by its sessions. A backend that cannot work here (pocketsphinx
    not installed) means transcription off, with a warning, as a missing espeak voice means text only."""
    from duplex.transcription import TranscriptionError, TranscriptionSettings
    from duplex.transcription import make_transcriber as build

    key = settings.transcription_api_key
    try:
        return build(TranscriptionSettings(
            backend=settings.transcription, url=settings.transcription_url, model=settings.transcription_model,
            api_key=key.get_secret_value() if key is not None else None, language=settings.transcription_language,
            max_concurrency=settings.transcription_max_concurrency, timeout_s=settings.transcription_timeout_s,
        ))
    except TranscriptionError as exc:
        log.warning("input transcription unavailable (%s); it is off", exc)
        return NoTranscription()


async def prepare_transcription(state: AppState) -> None:
    """Once the engines run: start the transcriber's workers ahead of the first user. An engine that cannot
    hear (no trained audio tower) hears through it; without it, that model's users are not understood."""
    from duplex.transcription import TranscriptionError

    try:
        await state.transcriber.warmup()
    except TranscriptionError as exc:
        log.warning("input transcription failed to start (%s); it is off", exc)
        state.transcriber = NoTranscription()
    deaf = [e for e in state.pool.engines if not hears(e.config)]
    if deaf and not state.transcriber.enabled:
        log.warning("the model has no trained audio tower and input transcription is off: spoken input is not "
                    "understood (set transcription: pocketsphinx or http)")


def resolve_models(settings: ServerSettings) -> list[str]:
    if settings.models:
        return list(settings.models)
    from models.embedded import demo_checkpoint

    log.warning(
        "no model given: serving the embedded DEMO model (SmolLM2-135M-Instruct in the VITA layout, random "
        "vision/audio towers). It hears speech through input transcription (transcription=%s); images and "
        "video are dropped with a notice.", settings.transcription
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
    vad = VadHub(scan_all="vad" in settings.hot_path_off)
    state = AppState(
        settings=settings,
        pool=pool,
        vad=vad,
        metrics=Metrics(
            in_flight=lambda: float(pool.requests_in_flight()),
            engines_serving=lambda: float(len(pool.serving_engines())),
            degraded=lambda: float(pool.degraded),
            vad_worker=lambda: float(vad.worker_ready),
        ),
        tts_factory=make_tts_factory(settings, pool),
        transcriber=make_transcriber(settings),
    )
    pool.on_restart = state.metrics.engine_restarts.inc
    state.metrics.session_memory.set_function(lambda: float(sum(c.held_bytes() for c in list(state.connections))))
    state.metrics.session_memory_max.set_function(
        lambda: float(max((c.held_bytes() for c in list(state.connections)), default=0))
    )
    state.metrics.session_memory_budget.set(settings.session_memory_mib << 20)
    state.metrics.sessions_ended_in_memory.set_function(lambda: float(len(state.ended_sessions)))
    state.metrics.requests_ended_in_memory.set_function(lambda: float(len(state.ended_requests)))
    state.metrics.tts_in_flight.set_function(lambda: float(pool.voice_requests_in_flight()))

    async def start_engines() -> None:
        try:
            pool.model_dirs = await asyncio.to_thread(resolve_models, settings)
            await pool.start()
            await prepare_transcription(state)
            log.info("ready: %d engine(s) on %s", len(pool.engines), ", ".join(pool.model_dirs))
            await pool.watch()
        except Exception as exc:
            state.startup_error = f"{type(exc).__name__}: {exc}"
            log.exception("engines failed to start")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Engines load in the background so /health answers at once and /ready says when to route.
        task = asyncio.create_task(start_engines())
        if "vadproc" not in settings.hot_path_off:
            try:
                vad.start_worker()  # ready in a second or two; until then the VAD scores on the loop
            except OSError as exc:
                log.error("the VAD worker process did not start (%s); the VAD runs on the event loop", exc)
        lag = asyncio.create_task(state.metrics.watch_loop_lag(), name="loop-lag")
        dumping = _install_task_dump()
        yield
        if dumping:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        for background in (task, lag):
            background.cancel()
            with contextlib.suppress(BaseException):
                await background
        vad.close()
        await pool.shutdown()
        await state.transcriber.aclose()
        if state.executor is not None:
            state.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="vita-duplex", version="0.1.0", lifespan=lifespan)
    app.state.vita = state

    app.add_middleware(GuardMiddleware, settings=settings)
    app.add_middleware(BodyDeadlineMiddleware, timeout_s=settings.body_timeout_s)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> Response:
        if state.pool.ready and not state.shutting_down:
            # "degraded": an engine is restarting and the others serve its role; still worth routing to.
            serving = len(state.pool.serving_engines())
            return JSONResponse({"status": state.pool.state, "engines": len(state.pool.engines), "serving": serving})
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
            needs_key = bool(self.settings.api_keys) and _needs_key(scope["path"], self.settings)
            if needs_key and not key_matches(bearer_token(headers.get("authorization")), self.settings.api_keys):
                refusal = _error(401, "invalid_api_key", "missing or invalid API key (Authorization: Bearer <key>)")
            if refusal is None and not origin_allowed(headers.get("origin"), self.settings.allowed_origins):
                refusal = _error(403, "origin_not_allowed", "this Origin is not in the server's allow-list")
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


# With api_keys set, the API and its description need a key; the probes (/health, /ready) and the static web
# page stay open, and /metrics too unless `metrics_auth` (Prometheus usually scrapes without credentials).
DOC_PATHS = ("/docs", "/redoc", "/openapi.json")


def _needs_key(path: str, settings: ServerSettings) -> bool:
    if path.startswith("/v1/") or path == "/metrics" and settings.metrics_auth:
        return True
    return any(path == p or path.startswith(p + "/") for p in DOC_PATHS)


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
