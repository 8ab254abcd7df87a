"""WS /v1/realtime: the OpenAI Realtime protocol over one `DuplexSession` per connection.

One task reads client events (server/wire/client_events.py) and feeds the session; one task turns the
session's actions into typed server events (realtime_conversation.py); one task writes to the socket
from a bounded queue (a client that stops reading is closed with a reason instead of growing memory).
What session.update set lives in realtime_config.py. Malformed or unknown events get an `error` event
and the socket stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from openai.types.realtime import InputAudioBufferClearedEvent, SessionCreatedEvent, SessionUpdatedEvent
from PIL import Image

from duplex.controller import ControllerSettings
from duplex.echo import EchoGuardParams
from duplex.events import (
    InputAudio,
    InputImage,
    InputText,
    ResponseRequested,
    SegmentClassified,
    SessionUpdated,
    UserItem,
)
from duplex.runtime import DuplexSession, RuntimeSettings, state_tokens_for
from duplex.tts import TextOnlyTTS
from models.config import hears
from models.engine import Sampling
from models.errors import InvalidImageError

from . import limits
from .auth import bearer_token, key_matches, origin_allowed, subprotocol_key
from .limits import MAX_INSTRUCTIONS_CHARS
from .logs import session_id_var
from .media import VisionGeometry, check_image_mime, frame_at_model_size, image_at_model_size
from .realtime_config import RealtimeConfig
from .realtime_conversation import OUTPUT_RATE, Conversation, new_item_id
from .resampling import StreamResampler
from .state import AppState
from .wire.audio_codec import AudioFormat, AudioFormatError, check_pcm16, decode
from .wire.client_events import (
    AudioAppend,
    AudioClear,
    AudioCommit,
    FrameAppend,
    ItemCreate,
    ItemDelete,
    ItemRetrieve,
    ItemTruncate,
    OutputAudioBufferClear,
    ResponseCancel,
    ResponseCreate,
    SessionUpdate,
    TextAppend,
    Transcription,
    TurnDetection,
    audio_append_fields,
    parse_audio_append,
    parse_client_event,
)
from .wire.errors import ErrorCode, ProtocolError, realtime_error
from .wire.inline_data import InlineDataError, decode_base64, decode_inline
from .wire.items import UserPart
from .wire.server_events import ServerEvent, ServerEventEncoder
from .wire.vita_events import VitaEvent
from .ws_protocol import TEXT_CONSUMER_EXTENSION

log = logging.getLogger(__name__)
router = APIRouter()

# At capacity, a new session waits this long for a slot before 1013: a client that closes and reconnects at
# once (its old socket's end still on its way through the server) is not refused below capacity. Short: a
# refused client is told soon, and the wait holds nothing but its socket.
ADMISSION_GRACE_S = 1.0


@router.websocket("/v1/realtime")
async def realtime(ws: WebSocket) -> None:
    state: AppState = ws.app.state.vita
    settings = state.settings
    offered = list(ws.scope.get("subprotocols") or [])
    key = bearer_token(ws.headers.get("authorization")) or subprotocol_key(offered)
    await ws.accept(subprotocol="realtime" if "realtime" in offered else None)
    if settings.api_keys and not key_matches(key, settings.api_keys):
        await ws.close(code=1008, reason="invalid or missing API key")
        return
    if not origin_allowed(ws.headers.get("origin"), settings.allowed_origins):
        await ws.close(code=1008, reason="origin not allowed")
        return
    if not state.pool.ready:
        events = ServerEventEncoder()
        loading = realtime_error(ErrorCode.ENGINES_NOT_READY, "the engines are still loading; retry shortly")
        await ws.send_text(events.encode(events.error(loading)))
        await ws.close(code=1013, reason="engines not ready")
        return
    if state.shutting_down:
        await ws.close(code=1001, reason="server shutting down")
        return
    if not await state.admit(ADMISSION_GRACE_S):
        await ws.close(code=1013, reason=f"server at capacity ({settings.max_sessions} sessions)")
        return
    state.metrics.sessions.inc()
    released = False

    def release() -> None:
        """Once: when the session is over (before any close handshake, which a client may drag out), so a
        client that reconnects at once finds its slot free."""
        nonlocal released
        if not released:
            released = True
            state.metrics.sessions.dec()
            state.release()

    connection: RealtimeConnection | None = None
    try:
        connection = RealtimeConnection(ws, state, vita_events=_flag(ws.query_params.get("vita_events"),
                                                                     default=settings.vita_events), on_end=release)
        state.connections.add(connection)
        await connection.run()
    finally:
        state.connections.discard(connection)
        if connection is not None:
            state.ended_sessions.add(connection)
        release()



@dataclass
class _Closing(Exception):
    code: int
    reason: str


@dataclass(eq=False)  # identity semantics: live connections are kept in a set
class RealtimeConnection:
    ws: WebSocket
    state: AppState
    vita_events: bool = True  # False: no vita.* server events (strict GA clients treat them as errors)
    session_id: str = field(default_factory=lambda: "sess_" + uuid.uuid4().hex[:20])
    on_end: Callable[[], None] = lambda: None  # the session is over (its slot is freed here)

    def __post_init__(self) -> None:
        s = self.state.settings
        self.tts_factory = self.state.tts_factory
        speaks = not isinstance(self.tts_factory(), TextOnlyTTS)
        vad_defaults = TurnDetection(
            threshold=s.vad_threshold,
            prefix_padding_ms=s.vad_prefix_padding_ms,
            silence_duration_ms=s.vad_silence_duration_ms,
            create_response=True,
            interrupt_response=True,
        )
        self.config = RealtimeConfig(
            model=self.state.pool.model_id,
            max_output_tokens=s.max_tokens,
            output_modalities=["audio"] if speaks else ["text"],
            vad_defaults=vad_defaults,
            turn_detection=vad_defaults,
        )
        self.to_16k = _input_resampler(self.config.input_format)
        self.events = ServerEventEncoder()
        self.conversation = Conversation(self.events, self.config, self.state.metrics, self.session_id)
        self.manual_audio: list[np.ndarray] = []
        self.manual_samples = 0
        self.send_queue: asyncio.Queue[str] = asyncio.Queue()
        self.queued_bytes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: _Closing | None = None
        self._close_task: asyncio.Future[None] | None = None
        self._finished = asyncio.Event()
        engines = self.state.pool.routes  # while an engine restarts, the others serve its role
        runtime = RuntimeSettings(
            controller=ControllerSettings(
                engines=min(2, len(engines)),
                state_tokens=state_tokens_for(engines[0]),
                history_turns=s.history_turns,
                no_state_token_policy=s.no_state_token_policy,
                output_sample_rate=OUTPUT_RATE,
                audio_output="audio" in self.config.output_modalities,
            ),
            vad=self.config.vad_params(s),
            sampling=Sampling(max_tokens=s.max_tokens, temperature=s.temperature),
            echo=EchoGuardParams(enabled=s.echo_guard),
        )
        self.session = DuplexSession(
            engines, self.tts_factory(), self.state.vad, runtime, session_id=self.session_id,
            run_blocking=self.state.offload,
            transcriber=self.state.transcriber, transcription_language=s.transcription_language,
        )
        self._transcribing: set[asyncio.Task[None]] = set()  # items' transcription events on their way
        self.geometry = VisionGeometry.of(engines[0].prompts.config)
        self.memory_budget = s.session_memory_mib << 20
        # Issue 14's input-path optimisations, each switchable (settings.hot_path_off) for bench/load.py.
        self._fast_append = "append" not in s.hot_path_off
        self._idle_timer = "idle" not in s.hot_path_off
        # Appends taken in the transport's callback (_take_directly) when the protocol offers it; it relies on
        # the fast parser and on the idle timer (_read's receive has no timeout around it then).
        self._direct = "direct" not in s.hot_path_off and self._fast_append and self._idle_timer
        self._waiting = False  # _read waits in receive() with every earlier event handled
        # A text within both size bounds _read checks first (the event limit, the offload threshold), counted
        # in characters: at most 4 UTF-8 bytes each.
        self._direct_chars = min(s.max_event_bytes, limits.OFFLOAD_EVENT_BYTES) // 4
        self._loop_time: Callable[[], float] = time.monotonic
        self._last_input = 0.0  # loop time of the last client event (the idle timer reads it)
        self._bound_memory = "memcheck" not in s.hot_path_off
        self._held_bound = 0  # >= what the session holds: the last exact figure plus the audio appended since
        self._held_checked = -math.inf  # monotonic time of that exact figure
        # Appended audio held back, as received, while it could not complete the VAD's next window (_hold):
        # resampled, echo-gated and pushed in one pass once it can, or before any other event is handled.
        self._defer = "defer" not in s.hot_path_off
        self._held_audio: list[bytes] = []
        self._held_wire = 0  # wire samples in _held_audio
        # Wire samples that may be held (_hold_room, from the last pass) and the bytes per wire sample then; 0
        # until the next pass after any other event (a clear or an update changes the stream or the format).
        self._hold_room = 0
        self._hold_width = 2

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        session_id_var.set(self.session_id)
        log.info("session opened")
        self._send(self.events.new(SessionCreatedEvent, type="session.created", session=self.config.ga_session()))
        for code, message in self._hearing_notices():
            self._send(self.conversation.notice(code, message))
        tasks = self._tasks = [
            asyncio.create_task(self._read(), name="read"),
            asyncio.create_task(self._translate(), name="translate"),
            asyncio.create_task(self._write(), name="write"),
        ]
        if self._idle_timer:
            tasks.append(asyncio.create_task(self._watch_idle(), name="idle"))
        consumer = self.ws.scope.get("extensions", {}).get(TEXT_CONSUMER_EXTENSION) if self._direct else None
        if consumer is not None:
            self._loop_time = asyncio.get_running_loop().time
            consumer["register"](self._take_directly)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = None if task.cancelled() else task.exception()
                if isinstance(exc, _Closing):  # its traceback would hold the task's frame, and so this connection
                    self._closing = self._closing or exc.with_traceback(None)
                elif exc is not None and not isinstance(exc, WebSocketDisconnect):
                    log.error("session failed", exc_info=exc)
                    self._closing = self._closing or _Closing(1011, "internal error")
        finally:
            if consumer is not None:
                consumer["register"](None)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # A finished task keeps its exception, whose traceback holds the task's frame and so this
            # connection: a cycle that only a full collection (rare in a process this size) would free, with
            # the session's audio, items and sockets in it. Dropping the tasks lets reference counting free
            # the session as soon as the socket's handler returns.
            self._tasks = []
            tasks.clear()
            await self.session.close()  # abort engine requests, stop TTS: nothing outlives the socket
            self.manual_audio, self.manual_samples = [], 0  # the memory goes back now, not after the close handshake
            self.on_end()
            if self._closing is not None:
                log.info("closing session: %s", self._closing.reason)
                # The close frame is queued at once; completing the close handshake needs a client that
                # reads, so wait briefly and let it finish in the background (never cancel it midway).
                closing = asyncio.ensure_future(self._close_socket(self._closing))
                self.state.background.add(closing)
                closing.add_done_callback(self.state.background.discard)
                await asyncio.wait({closing}, timeout=2)
            self._finished.set()
            log.info("session closed")

    async def _close_socket(self, closing: _Closing) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code=closing.code, reason=closing.reason)

    async def close(self, code: int, reason: str) -> None:
        """End the session from the server side with a close code and a reason the client sees."""
        self._closing = self._closing or _Closing(code, reason)
        for task in self._tasks:
            task.cancel()
        await self._finished.wait()

    async def _write(self) -> None:
        while True:
            text = await self.send_queue.get()
            self.queued_bytes -= len(text)
            try:
                await self.ws.send_text(text)
            except (RuntimeError, OSError, ConnectionError) as exc:  # the client went away mid-send
                raise WebSocketDisconnect(1006) from exc

    def _send(self, event: ServerEvent) -> None:
        if self._closing is not None or (not self.vita_events and isinstance(event, VitaEvent)):
            return
        text = self.events.encode(event)
        limit = self.state.settings.max_send_buffer_bytes
        if self.queued_bytes + len(text) > limit:
            # The client stopped reading: end this session rather than buffer without bound.
            log.warning("send buffer over %d bytes: client is not reading", limit)
            # Keep a reference: the event loop holds tasks only weakly.
            self._close_task = asyncio.ensure_future(self.close(1008, "client is not reading events (send buffer full)"))
            return
        self.queued_bytes += len(text)
        self.send_queue.put_nowait(text)

    def _error(self, code: ErrorCode, message: str, param: str | None = None, event_id: str | None = None) -> None:
        self._refuse(ProtocolError(code, message, param, event_id))

    def _refuse(self, exc: ProtocolError) -> None:
        self.state.metrics.errors.labels(code=exc.code).inc()
        self._send(self.events.error(exc.as_error()))

    def _send_all(self, events: list[ServerEvent]) -> None:
        for event in events:
            self._send(event)

    # --- client → session -----------------------------------------------------------------------

    async def _watch_idle(self) -> None:
        """Close the session once no client event came for idle_timeout_s: one timer per session that re-arms
        itself to the last event's time, instead of a timeout armed and cancelled around every receive (~9 us
        of a 20 ms audio event's budget; bench/RESULTS.md, issue 14)."""
        loop = asyncio.get_running_loop()
        idle = self.state.settings.idle_timeout_s
        self._last_input = loop.time()
        while (left := self._last_input + idle - loop.time()) > 0:
            await asyncio.sleep(left)
        raise _Closing(1000, f"idle for {idle:.0f} s")

    async def _read(self) -> None:
        limit = self.state.settings.max_event_bytes
        idle = self.state.settings.idle_timeout_s
        loop = asyncio.get_running_loop()
        while True:
            if self._idle_timer:  # _watch_idle ends an idle session
                self._waiting = True  # _take_directly may handle what comes now
                try:
                    message = await self.ws.receive()
                finally:
                    self._waiting = False
                self._last_input = loop.time()
            else:
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that lands as the receive
                    # completes, and under a flood of input that is every time: close() would never end this task.
                    async with asyncio.timeout(idle):
                        message = await self.ws.receive()
                except TimeoutError:
                    raise _Closing(1000, f"idle for {idle:.0f} s") from None
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            text = message.get("text")
            if text is None:
                self._error(ErrorCode.BINARY_NOT_SUPPORTED, "send JSON text events; binary frames are not accepted")
                continue
            size = len(text) if len(text) * 4 <= limit else len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                self._error(ErrorCode.EVENT_TOO_LARGE, f"event of {size} bytes exceeds the limit of {limit} bytes")
                continue
            try:
                append = parse_audio_append(text) if self._fast_append and size <= limits.OFFLOAD_EVENT_BYTES \
                    else None
                if append is not None:  # the hot event (fifty a second per session), straight to its handler
                    handled = self._on_append(append)
                else:
                    parsed = await self.state.offload(parse_client_event, text) if size > limits.OFFLOAD_EVENT_BYTES \
                        else parse_client_event(text)
                    handled = self._handle(parsed)
                if handled is not None:  # heavy work off the event loop; this session's next event waits for it
                    await handled
                    self._last_input = loop.time()  # the session was busy, not idle
            except (ProtocolError, ValueError) as exc:  # a 400-style answer; the session goes on
                self._refused(exc)

    def _refused(self, exc: ProtocolError | ValueError) -> None:
        """How an event the session refuses is answered, wherever it was handled (`_read`, `_take_directly`).
        A ValueError is input the parser let through but the session refuses: a bug in the parser's checks, yet
        the client's fault too; it is answered and the session kept (the traceback goes to the log)."""
        if isinstance(exc, ProtocolError):
            self._refuse(exc)
            return
        log.warning("event refused past the parser", exc_info=exc)
        self._error(ErrorCode.INVALID_VALUE, str(exc)[:500])

    def _take_directly(self, text: str) -> bool:
        """The WebSocket protocol's text consumer (server/ws_protocol.py): a small append that arrives while
        `_read` waits with nothing queued is handled here, in the transport's callback, exactly as `_read`
        would handle it (the same checks, handler and errors); anything else returns False and is queued for
        `_read`. Saves the queue, a task switch and the ASGI receive chain per 20 ms event (issue 14)."""
        if not self._waiting or self._closing is not None or len(text) > self._direct_chars:
            return False
        fields = audio_append_fields(text)  # what the handler reads of the event, without building it
        if fields is None or len(fields[0]) > limits.OFFLOAD_AUDIO_CHARS:
            return False
        self._last_input = self._loop_time()
        try:
            self._append(*fields)  # small: never returns an awaitable (checked above)
        except (ProtocolError, ValueError) as exc:
            self._refused(exc)
        except Exception as exc:  # what would have ended _read ends the session the same way
            log.error("session failed", exc_info=exc)
            self._closing = self._closing or _Closing(1011, "internal error")
            for task in self._tasks:
                task.cancel()
        return True

    def _handle(self, event: Any) -> Awaitable[None] | None:
        if type(event) is not AudioAppend:
            if self._held_audio:  # every other event sees all audio before it
                self._release_held()
            self._hold_room = 0  # it may change the stream or the format: the next append makes a pass
        handler = {
            SessionUpdate: self._on_session_update,
            AudioAppend: self._on_append,
            AudioCommit: self._on_commit,
            AudioClear: self._on_clear,
            ItemCreate: self._on_item_create,
            ItemTruncate: self._on_truncate,
            ItemDelete: self._on_delete,
            ItemRetrieve: self._on_retrieve,
            OutputAudioBufferClear: self._on_output_clear,
            ResponseCreate: self._on_response_create,
            ResponseCancel: self._on_response_cancel,
            FrameAppend: self._on_frame,
            TextAppend: self._on_text,
        }[type(event)]
        return handler(event)  # type: ignore[no-any-return]

    # --- bounds (server/limits.py) -----------------------------------------------------------------

    def held_bytes(self) -> int:
        """What this session holds of its client's input (the budget `session_memory_mib` bounds)."""
        return (self.session.held_bytes() + self.manual_samples * 4 + self.conversation.items.chars
                + limits.model_samples(self._held_wire, self.config.input_format.rate) * 4)

    def _check_audio_memory(self, more: int, event_id: str | None) -> None:
        """`_check_memory` for an append (fifty a second): while an upper bound of what the session holds (the
        exact figure at the last check plus every append since) stays under the budget it decides; the exact
        figure is taken again once a second, and always before refusing, so the answers are the same."""
        if self._bound_memory:
            bound = self._held_bound + more
            if bound <= self.memory_budget and time.monotonic() - self._held_checked < 1.0:
                self._held_bound = bound
                return
        self._check_memory(more, "this audio", "audio", event_id)

    def _check_memory(self, more: int, what: str, param: str | None, event_id: str | None) -> None:
        """Refuse an input that would take this session past its memory budget."""
        held = self.held_bytes()
        self._held_bound, self._held_checked = held + more, time.monotonic()
        if held + more > self.memory_budget:
            raise ProtocolError(
                ErrorCode.SESSION_MEMORY_EXCEEDED,
                f"{what} ({more / 2**20:.1f} MiB) would take this session to {(held + more) / 2**20:.1f} MiB; it may "
                f"hold {self.memory_budget / 2**20:.0f} MiB of frames, audio, items and history. Commit or clear "
                "the audio buffer, ask for a response, or wait for older frames to age out",
                param, event_id)

    def _wire_samples(self, raw: bytes, param: str, event_id: str | None) -> int:
        """Samples in `raw` at the input format's rate, refusing (before decoding) more than one turn holds."""
        fmt = self.config.input_format
        count = len(raw) // fmt.sample_bytes
        longest = self.state.settings.max_buffered_audio_s
        if count > longest * fmt.rate:  # audio_duration_problem's bound, tested first: a call less per event
            problem = limits.audio_duration_problem(count, fmt.rate, longest, "the audio of one event")
            if problem is not None:
                raise ProtocolError(ErrorCode.INVALID_AUDIO, f"{problem}; send audio in chunks", param, event_id)
        return count

    def _on_text(self, event: TextAppend) -> None:
        _check_text(len(event.text), "text", "text", event.event_id)
        self.session.send_text(event.text)

    def _on_session_update(self, event: SessionUpdate) -> None:
        cfg, config = event.session, self.config
        if cfg.instructions is not None:
            _check_instructions(cfg.instructions, "session.instructions", event.event_id)
        voice = cfg.voice or (cfg.audio and cfg.audio.output and cfg.audio.output.voice)
        if voice and len(voice) > limits.MAX_VOICE_CHARS:  # checked before anything of the update applies
            raise ProtocolError(ErrorCode.STRING_ABOVE_MAX_LENGTH, f"voice is {len(voice)} characters; a voice is a "
                                f"name of at most {limits.MAX_VOICE_CHARS}", "session.audio.output.voice",
                                event.event_id)
        try:
            fmt_in = cfg.input_audio_format or (cfg.audio and cfg.audio.input and cfg.audio.input.format)
            fmt_out = cfg.output_audio_format or (cfg.audio and cfg.audio.output and cfg.audio.output.format)
            new_in = AudioFormat.parse(fmt_in) if fmt_in else config.input_format
            new_out = AudioFormat.parse(fmt_out) if fmt_out else config.output_format
        except AudioFormatError as exc:
            raise ProtocolError(ErrorCode.INVALID_AUDIO_FORMAT, str(exc), "session.audio", event.event_id) from None
        if new_in != config.input_format:
            config.input_format, self.to_16k = new_in, _input_resampler(new_in)
        config.output_format = new_out
        modalities = cfg.modalities_given()
        if modalities:
            if "audio" in modalities and isinstance(self.tts_factory(), TextOnlyTTS):
                self._error(ErrorCode.AUDIO_OUTPUT_UNAVAILABLE, "this server has no speech output; answering in "
                            "text", "session.output_modalities", event.event_id)
                modalities = ["text"]
            config.output_modalities = ["audio"] if "audio" in modalities else ["text"]
        voice = cfg.voice or (cfg.audio and cfg.audio.output and cfg.audio.output.voice)
        if voice:
            config.voice = voice
        given, detection = cfg.turn_detection_given()
        update: dict[str, Any] = {"audio_output": "audio" in config.output_modalities}
        if given:
            if detection is not None:
                merged = config.update_turn_detection(detection)
                self.session.set_vad_params(config.vad_params(self.state.settings))
                update["interrupt_response"] = merged.interrupt_response is not False
                update["create_response"] = merged.create_response is not False
            else:
                config.turn_detection = None  # manual turns: commit + response.create
                self.session.set_vad_params(None)
        if cfg.instructions is not None:
            config.instructions = cfg.instructions
            update["instructions"] = cfg.instructions
        budget = cfg.max_output_tokens if cfg.max_output_tokens is not None else cfg.max_response_output_tokens
        if budget is not None:
            # The server's max_tokens is the ceiling ("inf" means it): one session must not hold an
            # engine for as long as it likes.
            ceiling = self.state.settings.max_tokens
            config.max_output_tokens = ceiling if budget == "inf" else min(budget, ceiling)
            self.session.set_max_tokens(config.max_output_tokens)
        given, transcription = cfg.transcription_given()
        if given:
            self._set_transcription(transcription, event.event_id)
        self.session.feed(SessionUpdated(**update))
        self._send(self.events.new(SessionUpdatedEvent, type="session.updated", session=config.ga_session()))

    def _set_transcription(self, wanted: Transcription | None, event_id: str | None) -> None:
        """`audio.input.transcription`: on (the server's backend, with the session's language and prompt) or
        off (null). `session.updated` reports the backend's model, as in effect."""
        if wanted is None:
            self.config.transcription = None
            return
        transcriber = self.state.transcriber
        if not transcriber.enabled:
            self.config.transcription = None
            self._error(ErrorCode.TRANSCRIPTION_UNAVAILABLE, "this server has no input transcription "
                        "(its transcription setting is none); transcription stays off",
                        "session.audio.input.transcription", event_id)
            return
        language = wanted.language or self.state.settings.transcription_language
        self.session.transcripts.language = language
        self.session.transcripts.prompt = wanted.prompt
        effect = {"model": str(getattr(transcriber, "model", transcriber.name))}
        if language:
            effect["language"] = language
        if wanted.prompt:
            effect["prompt"] = wanted.prompt
        self.config.transcription = effect

    def _on_append(self, event: AudioAppend) -> Awaitable[None] | None:
        return self._append(event.audio, event.event_id)

    def _append(self, audio: str, event_id: str | None) -> Awaitable[None] | None:
        """`input_audio_buffer.append`'s handler, from its two fields (`_take_directly` builds no event)."""
        # A client's usual 20-100 ms chunks are handled here; seconds of audio at once go off the loop.
        if len(audio) > limits.OFFLOAD_AUDIO_CHARS:
            return self._append_offloaded(audio, event_id)
        raw = self._append_bytes(audio, event_id)
        self._check_append(raw, event_id)
        if self._hold(raw):
            return None
        if self._held_audio:
            raw = self._with_held(raw)
        self._take_audio(self._append_samples(raw, event_id))
        self._new_hold_room()
        return None

    def _hold(self, raw: bytes) -> bool:
        """Keep this append's audio back (with any held before it) when, resampled, it could not complete the
        VAD's next window and nothing follows the microphone's position more closely
        (`DuplexSession.mic_watched`): then nothing the session does or says depends on it yet, and one pass
        (decode, resample, echo gate, VAD push) per window costs less than one per event (issue 14: a 32 ms
        window, 20 ms events). Only whole samples are held, so a held chunk never joins a malformed one."""
        room, width = self._hold_room, self._hold_width
        if room <= 0 or len(raw) % width:
            return False
        count = self._held_wire + len(raw) // width
        if count > room or self.session.mic_watched:
            return False
        self._held_audio.append(raw)
        self._held_wire = count
        return True

    def _new_hold_room(self) -> None:
        """After a pass: how many wire samples the next appends may hold (`_hold`)."""
        if not self._defer or self.config.turn_detection is None:
            self._hold_room = 0
            return
        self._hold_width = self.config.input_format.sample_bytes
        slack = self.session.audio_slack()
        self._hold_room = self.to_16k.inputs_below(slack) if slack else 0

    def _with_held(self, raw: bytes) -> bytes:
        """The held audio followed by `raw` (whole samples of the same format: the held chunks passed `_hold`'s
        check, and `raw` joins them only when it has whole samples too), and nothing held any more."""
        if len(raw) % self._hold_width:  # malformed: the held audio goes on its own first, `raw` is refused alone
            self._release_held()
            return raw
        joined = b"".join((*self._held_audio, raw))
        self._held_audio, self._held_wire = [], 0
        return joined

    def _release_held(self) -> None:
        """Push the held audio now (before another event, or a long append, is handled)."""
        raw = b"".join(self._held_audio)
        self._held_audio, self._held_wire = [], 0
        self._take_audio(self._append_samples(raw, None))
        self._new_hold_room()

    async def _append_offloaded(self, audio: str, event_id: str | None) -> None:
        if self._held_audio:
            self._release_held()
        self._hold_room = 0  # the stream may be scored apart meanwhile: the next small append makes a pass
        raw = await self.state.offload(self._append_bytes, audio, event_id)
        self._check_append(raw, event_id)
        samples = await self.state.offload(self._append_samples, raw, event_id)
        if self.config.turn_detection is not None:
            await self.session.push_audio_offloaded(samples)  # the VAD scores it off the loop too
            return
        self._take_audio(samples)

    def _append_bytes(self, audio: str, event_id: str | None) -> bytes:
        try:
            return decode_base64(audio, "audio", allow_empty=True)
        except InlineDataError as exc:
            raise ProtocolError(ErrorCode.INVALID_AUDIO, f"{exc}; expected base64 {self._fmt_text()}", "audio",
                                event_id) from None

    def _check_append(self, raw: bytes, event_id: str | None) -> None:
        """Bounds from the byte count, before anything is decoded or resampled."""
        config = self.config
        incoming = limits.model_samples(self._wire_samples(raw, "audio", event_id), config.input_format.rate)
        if config.turn_detection is None:
            limit = int(self.state.settings.max_buffered_audio_s * 16000)
            if self.manual_samples + incoming > limit:
                raise ProtocolError(ErrorCode.INPUT_AUDIO_BUFFER_FULL,
                                    f"the input audio buffer holds at most {self.state.settings.max_buffered_audio_s:.0f}"
                                    " s; commit or clear it", "audio", event_id)
        self._check_audio_memory(incoming * 4, event_id)

    def _append_samples(self, raw: bytes, event_id: str | None) -> np.ndarray:
        try:
            fmt = self.config.input_format
            if fmt.encoding == "pcm16":  # the resampler takes the bytes: `decode`'s samples, no array between
                check_pcm16(raw)
                return self.to_16k.pcm16(raw)
            return self.to_16k(decode(raw, fmt))
        except AudioFormatError as exc:
            raise ProtocolError(ErrorCode.INVALID_AUDIO, f"{exc}; expected base64 {self._fmt_text()}", "audio",
                                event_id) from None

    def _take_audio(self, samples: np.ndarray) -> None:
        if self.config.turn_detection is not None:
            self.session.push_audio(samples)
            return
        self.manual_audio.append(samples)
        self.manual_samples += len(samples)

    def _on_commit(self, event: AudioCommit) -> None:
        if self.config.turn_detection is not None:
            if not self.session.flush_speech():
                raise ProtocolError(ErrorCode.INPUT_AUDIO_BUFFER_COMMIT_EMPTY, "no speech in progress to commit",
                                    None, event.event_id)
            return
        if self.manual_samples < 1600:
            raise ProtocolError(ErrorCode.INPUT_AUDIO_BUFFER_COMMIT_EMPTY,
                                "the input audio buffer has less than 100 ms of audio", None, event.event_id)
        audio = np.concatenate(self.manual_audio)
        self.manual_audio, self.manual_samples = [], 0
        item_id = new_item_id()
        self._send_all(self.conversation.audio_committed(item_id))
        self._transcribe(item_id, 0, audio)
        self.session.feed(UserItem((InputAudio(audio),)))

    def _on_clear(self, event: AudioClear) -> None:
        self.manual_audio, self.manual_samples = [], 0
        if self.config.turn_detection is not None:  # a fresh VAD stream drops buffered audio
            self.session.set_vad_params(self.config.vad_params(self.state.settings))
        self._send(self.events.new(InputAudioBufferClearedEvent, type="input_audio_buffer.cleared"))

    def _on_item_create(self, event: ItemCreate) -> Awaitable[None] | None:
        item = event.item
        if item.role == "system":
            if any(p.type not in ("input_text", "text") for p in item.content):
                raise ProtocolError(ErrorCode.INVALID_CONTENT, "a system message takes input_text parts only",
                                    "item.content", event.event_id)
            texts = [p.text for p in item.content if p.text]
            instructions = "\n".join(filter(None, [self.config.instructions, *texts]))
            _check_instructions(instructions, "item.content", event.event_id)
            self.config.instructions = instructions
            self.session.feed(SessionUpdated(instructions=instructions))
            self._send_all(self.conversation.system_item(item.id or new_item_id(), texts))
            return
        if item.role != "user":
            raise ProtocolError(ErrorCode.UNSUPPORTED_ITEM, "only user and system messages can be added; VITA's "
                                "history keeps its own assistant turns", "item.role", event.event_id)
        media = False
        for i, part in enumerate(item.content):
            if part.type in ("input_text", "text") and part.text:
                continue
            if not ((part.type == "input_audio" and part.audio) or (part.type == "input_image" and part.image_url)):
                raise ProtocolError(ErrorCode.INVALID_CONTENT, f"{part.type} part is missing its data",
                                    f"item.content.{i}", event.event_id)
            media = True
        texts = sum(len(p.text) for p in item.content if p.type in ("input_text", "text") and p.text)
        _check_text(texts, "the item's text", "item.content", event.event_id)
        self._check_memory(texts, "this item's text", "item.content", event.event_id)
        if media:  # decoded off the event loop; this session's next event waits for it
            return self._add_user_item(event)
        self._user_item_added(event, [InputText(p.text) for p in item.content if p.text])
        return None

    async def _add_user_item(self, event: ItemCreate) -> None:
        parts: list[InputText | InputAudio | InputImage] = []
        held = 0  # bytes this item will hold, against the session's budget
        heard = 0  # 16 kHz samples of its audio: one turn's worth at most
        for i, part in enumerate(event.item.content):
            param = f"item.content.{i}"
            if part.type in ("input_text", "text") and part.text:
                parts.append(InputText(part.text))
            elif part.type == "input_audio" and part.audio:
                raw = await self.state.offload(_item_audio_bytes, part.audio, param, event.event_id)
                heard += limits.model_samples(self._wire_samples(raw, param, event.event_id),
                                              self.config.input_format.rate)
                problem = limits.audio_duration_problem(heard, 16000, self.state.settings.max_buffered_audio_s,
                                                        "the item's audio")
                if problem is not None:
                    raise ProtocolError(ErrorCode.INVALID_AUDIO, problem, param, event.event_id)
                self._check_memory(held + heard * 4, "this item", param, event.event_id)
                parts.append(InputAudio(await self.state.offload(self._item_audio, raw, param, event.event_id)))
            elif part.type == "input_image" and part.image_url:
                image = await self._decode_image(part.image_url, param, event.event_id, frame=False)
                held += image.width * image.height * len(image.getbands())
                self._check_memory(held + heard * 4, "this item", param, event.event_id)
                parts.append(InputImage(image))
        self._user_item_added(event, parts)

    def _item_audio(self, raw: bytes, param: str, event_id: str | None) -> np.ndarray:
        try:
            return self.to_16k_once(decode(raw, self.config.input_format))
        except AudioFormatError as exc:
            raise ProtocolError(ErrorCode.INVALID_AUDIO, str(exc), param, event_id) from None

    def _user_item_added(self, event: ItemCreate, parts: list[InputText | InputAudio | InputImage]) -> None:
        # The item as the conversation shows it: media by kind, never their bytes (OpenAI's echoes carry no
        # audio either), so an accepted item cannot fill a reading client's send buffer.
        echoed: list[UserPart] = [
            {"type": "input_text", "text": p.text} if isinstance(p, InputText)
            else {"type": "input_audio", "transcript": None} if isinstance(p, InputAudio)
            else {"type": "input_image"}
            for p in parts
        ]
        item_id = event.item.id or new_item_id()
        self._send_all(self.conversation.user_item(item_id, echoed))
        for index, part in enumerate(parts):
            if isinstance(part, InputAudio):
                self._transcribe(item_id, index, part.audio)
        self.session.feed(UserItem(tuple(parts)))

    def to_16k_once(self, samples: np.ndarray) -> np.ndarray:
        """A whole clip (an item's audio): equal to resampling it offline, as upstream does."""
        resampler = StreamResampler(self.config.input_format.rate, 16000)
        return np.concatenate([resampler(samples), resampler.flush()])

    def _on_truncate(self, event: ItemTruncate) -> None:
        response_id = self.conversation.response_of(event.item_id)
        if response_id is None:
            raise ProtocolError(ErrorCode.ITEM_NOT_FOUND, f"no assistant item {event.item_id!r} in this session",
                                "item_id", event.event_id)
        self.session.truncate(response_id, event.audio_end_ms)

    def _on_delete(self, event: ItemDelete) -> None:
        raise ProtocolError(ErrorCode.ITEM_DELETE_UNSUPPORTED, "VITA keeps a short rolling history; items cannot "
                            "be deleted (use session.update to change instructions)", "item_id", event.event_id)

    def _on_retrieve(self, event: ItemRetrieve) -> None:
        retrieved = self.conversation.retrieved(event.item_id)
        if retrieved is None:
            raise ProtocolError(ErrorCode.ITEM_NOT_FOUND, f"no item {event.item_id!r} among this session's recent "
                                "items", "item_id", event.event_id)
        self._send(retrieved)

    def _on_output_clear(self, event: OutputAudioBufferClear) -> None:
        raise ProtocolError(ErrorCode.UNSUPPORTED_EVENT, "output_audio_buffer.clear is for WebRTC/SIP, where the "
                            "server holds the playback buffer; over WebSocket the client does: stop playback there "
                            "and send conversation.item.truncate (or response.cancel)", "type", event.event_id)

    def _on_response_create(self, event: ResponseCreate) -> None:
        if event.response.instructions is not None:  # the same limit as session.update's
            _check_instructions(event.response.instructions, "response.instructions", event.event_id)
        wanted = event.response.output_modalities or event.response.modalities
        if wanted:
            self.conversation.next_modalities = ["audio"] if "audio" in wanted else ["text"]
        self.session.feed(ResponseRequested(instructions=event.response.instructions))

    def _on_response_cancel(self, event: ResponseCancel) -> None:
        self.session.cancel_response(event.response_id)

    async def _on_frame(self, event: FrameAppend) -> None:
        frame = await self._decode_image(event.image, "image", event.event_id, frame=True)
        self._check_memory(frame.width * frame.height * len(frame.getbands()), "this frame", "image", event.event_id)
        self.session.push_frame(frame)

    async def _decode_image(self, data: str, param: str, event_id: str | None, *, frame: bool) -> Image.Image:
        """Base64 or a data: URL → the image at model resolution (a camera frame: its one tile), decoded off
        the event loop with its pixel count checked from the header first."""
        if data.startswith(("http://", "https://", "file:")):  # (bare base64 JPEG starts with "/9j/")
            raise ProtocolError(ErrorCode.INVALID_IMAGE, "send images inline as base64 or a data: URL; remote "
                                "URLs and file paths are not fetched", param, event_id)
        size = self.geometry.image_size
        return await self.state.offload(_decode_image_blocking, data, param, event_id,
                                        lambda raw: frame_at_model_size(raw, size) if frame
                                        else image_at_model_size(raw, self.geometry))

    # --- session → client -----------------------------------------------------------------------

    async def _translate(self) -> None:
        while True:
            action = await self.session.outbound.get()
            self._send_all(self.conversation.events_for(action))
            if isinstance(action, SegmentClassified) and action.audio and not action.ignored:
                self._transcribe(self.conversation.segment_item(action.segment_id), 0, action.audio[0])
            # One action per loop turn: a verdict brings a dozen actions at once (~1-2 ms of event encoding
            # each), and the tasks it woke must not wait for all of them (a barge-in's TTS abort: ≤ 20 ms).
            await asyncio.sleep(0)

    # --- input transcription --------------------------------------------------------------------

    def _transcribe(self, item_id: str, content_index: int, audio: Any) -> None:
        """GA's transcription events for a committed user audio item, when the session turned them on. The
        transcription itself (shared with a model that hears through it) runs off the event loop, in the
        transcriber's worker processes or HTTP calls, and never holds up the answer."""
        if self.config.transcription is None:
            return

        async def follow() -> None:
            async for event in self.session.transcripts.of(audio).follow():
                self._send_all(self.conversation.transcription(item_id, content_index, event))

        task = asyncio.ensure_future(follow())
        self._transcribing.add(task)
        task.add_done_callback(self._transcribing.discard)

    def _hearing_notices(self) -> list[tuple[str, str]]:
        """What a client should know at once about how this model takes speech (vita.notice)."""
        if all(hears(engine.config) for engine in self.state.pool.engines):
            return []
        transcriber = self.state.transcriber
        how = (f"{transcriber.name} transcription" if transcriber.enabled
               else "transcription, which is off on this server (spoken turns are ignored)")
        hearing = (f"This model has no trained audio tower: it answers the transcript of what you say ({how}). "
                   "It cannot see: images and camera frames are left out.")
        notices = [("hears_through_transcription", hearing)]
        if not self.state.settings.models:
            demo = (f"CPU demo: {self.state.pool.model_id} (SmolLM2-135M-Instruct) hears you through {how}; "
                    "its answers are a small model's.")
            notices.insert(0, ("demo_model", demo))
        return notices

    def _fmt_text(self) -> str:
        f = self.config.input_format
        return f"PCM16 mono at {f.rate} Hz" if f.encoding == "pcm16" else f"G.711 {f.encoding} at 8000 Hz"


def _flag(value: str | None, default: bool) -> bool:
    """A yes/no query parameter; absent or unreadable: the default."""
    if value is None:
        return default
    return {"1": True, "true": True, "on": True, "yes": True,
            "0": False, "false": False, "off": False, "no": False}.get(value.strip().lower(), default)


def _input_resampler(fmt: AudioFormat) -> StreamResampler:
    """The session's microphone stream to 16 kHz; PCM16 goes in as the bytes it comes as (`_append_samples`)."""
    return StreamResampler(fmt.rate, 16000, pcm16_input=fmt.encoding == "pcm16")


def _check_instructions(text: str, param: str, event_id: str | None) -> None:
    if len(text) > MAX_INSTRUCTIONS_CHARS:
        raise ProtocolError(ErrorCode.INSTRUCTIONS_TOO_LONG, f"instructions would be {len(text)} characters; the "
                            f"limit is {MAX_INSTRUCTIONS_CHARS} (system items add to them)", param, event_id)


def _check_text(chars: int, what: str, param: str, event_id: str | None) -> None:
    problem = limits.text_problem(chars, what)
    if problem is not None:
        raise ProtocolError(ErrorCode.STRING_ABOVE_MAX_LENGTH, problem, param, event_id)


def _item_audio_bytes(text: str, param: str, event_id: str | None) -> bytes:
    try:
        return decode_base64(text, "audio")
    except InlineDataError as exc:
        raise ProtocolError(ErrorCode.INVALID_AUDIO, str(exc), param, event_id) from None


def _decode_image_blocking(data: str, param: str, event_id: str | None,
                           to_model: Callable[[bytes], Image.Image]) -> Image.Image:
    """(In the executor.) The inline image's bytes, its declared type checked as chat checks it, decoded."""
    try:
        inline = decode_inline(data, "image")
        check_image_mime(inline.mime, "image data URL")
        return to_model(inline.data)
    except (InlineDataError, InvalidImageError) as exc:
        raise ProtocolError(ErrorCode.INVALID_IMAGE, str(exc), param, event_id) from None
