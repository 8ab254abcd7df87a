"""WS /v1/realtime: the OpenAI Realtime protocol over one `DuplexSession` per connection.

One task reads client events and feeds the session; one task turns the session's actions into server
events; one task writes to the socket from a bounded queue (a client that stops reading is closed
with a reason instead of growing memory). Malformed or unknown events get an `error` event and the
socket stays open.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from PIL import Image

from duplex.controller import ControllerSettings
from duplex.echo import EchoGuardParams
from duplex.events import (
    ClearOutput,
    EmitAudio,
    EmitText,
    Error,
    InputAudio,
    InputImage,
    InputText,
    PauseOutput,
    ResponseDone,
    ResponseRequested,
    ResponseStarted,
    ResponseTruncated,
    ResumeOutput,
    RolesSwapped,
    SegmentClassified,
    SessionUpdated,
    SpeechStartedNotice,
    SpeechStoppedNotice,
    UserItem,
)
from duplex.runtime import DuplexSession, RuntimeSettings, state_tokens_for
from duplex.tts import TextOnlyTTS
from duplex.vad import VadParams
from models.engine import Sampling
from models.errors import InvalidImageError
from models.image_tiling import decode_image

from .app import AppState
from .audio_codec import AudioFormat, AudioFormatError, StreamResampler, decode, decode_base64, encode
from .auth import bearer_token, key_matches, origin_allowed, subprotocol_key
from .logs import session_id_var
from .protocol import (
    AudioAppend,
    AudioClear,
    AudioCommit,
    FrameAppend,
    ItemCreate,
    ItemDelete,
    ItemTruncate,
    ProtocolError,
    ResponseCancel,
    ResponseCreate,
    SessionUpdate,
    TextAppend,
    TurnDetection,
    error_event,
    parse_client_event,
)

log = logging.getLogger(__name__)
router = APIRouter()

OUTPUT_RATE = 24000  # the session runtime's output rate; converted to the wire format here
# Instructions go into every prompt: tokenized each turn and held in the KV cache. 32k characters is far
# past any real system prompt and still bounds what one client can make every turn cost.
MAX_INSTRUCTIONS_CHARS = 32_768


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
        await ws.send_json(error_event("engines_not_ready", "the engines are still loading; retry shortly",
                                       kind="server_error"))
        await ws.close(code=1013, reason="engines not ready")
        return
    if state.shutting_down:
        await ws.close(code=1001, reason="server shutting down")
        return
    if not state.try_admit():
        await ws.close(code=1013, reason=f"server at capacity ({settings.max_sessions} sessions)")
        return
    state.metrics.sessions.inc()
    connection = RealtimeConnection(ws, state)
    state.connections.add(connection)
    try:
        await connection.run()
    finally:
        state.connections.discard(connection)
        state.metrics.sessions.dec()
        state.release()


@dataclass
class _ResponseWire:
    response_id: str
    item_id: str
    modalities: list[str]
    text: str = ""
    audio_ms: float = 0.0
    first_delta_at: float | None = None


@dataclass
class _Closing(Exception):
    code: int
    reason: str


@dataclass(eq=False)  # identity semantics: live connections are kept in a set
class RealtimeConnection:
    ws: WebSocket
    state: AppState
    session_id: str = field(default_factory=lambda: "sess_" + uuid.uuid4().hex[:20])

    def __post_init__(self) -> None:
        s = self.state.settings
        self.fmt_in = AudioFormat()
        self.fmt_out = AudioFormat()
        self.to_16k = StreamResampler(self.fmt_in.rate, 16000)
        self.instructions: str | None = None
        self.max_output_tokens = self.state.settings.max_tokens
        self.voice = "vita"
        self.tts_factory = self.state.tts_factory
        speaks = not isinstance(self.tts_factory(), TextOnlyTTS)
        self.modalities: list[str] = ["audio"] if speaks else ["text"]
        self.next_modalities: list[str] | None = None
        self.turn_detection: TurnDetection | None = TurnDetection(
            threshold=s.vad_threshold,
            prefix_padding_ms=s.vad_prefix_padding_ms,
            silence_duration_ms=s.vad_silence_duration_ms,
            create_response=True,
            interrupt_response=True,
        )
        self.manual_audio: list[np.ndarray] = []
        self.manual_samples = 0
        self.responses: dict[str, _ResponseWire] = {}
        self.item_to_response: dict[str, str] = {}
        self.segment_items: dict[str, str] = {}
        self.last_item_id: str | None = None
        self.speech_stopped_at: float | None = None
        self.speech_started_at: float | None = None
        self.send_queue: asyncio.Queue[str] = asyncio.Queue()
        self.queued_bytes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: _Closing | None = None
        self._close_task: asyncio.Future[None] | None = None
        self._finished = asyncio.Event()
        engines = self.state.pool.engines
        runtime = RuntimeSettings(
            controller=ControllerSettings(
                engines=min(2, len(engines)),
                state_tokens=state_tokens_for(engines[0]),
                history_turns=s.history_turns,
                no_state_token_policy=s.no_state_token_policy,
                output_sample_rate=OUTPUT_RATE,
                audio_output="audio" in self.modalities,
            ),
            vad=self._vad_params(),
            sampling=Sampling(max_tokens=s.max_tokens, temperature=s.temperature),
            echo=EchoGuardParams(enabled=s.echo_guard),
        )
        self.session = DuplexSession(
            engines, self.tts_factory(), self.state.vad, runtime, session_id=self.session_id
        )

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        session_id_var.set(self.session_id)
        log.info("session opened")
        self._send(self._session_event("session.created"))
        tasks = self._tasks = [
            asyncio.create_task(self._read(), name="read"),
            asyncio.create_task(self._translate(), name="translate"),
            asyncio.create_task(self._write(), name="write"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = None if task.cancelled() else task.exception()
                if isinstance(exc, _Closing):
                    self._closing = self._closing or exc
                elif exc is not None and not isinstance(exc, WebSocketDisconnect):
                    log.error("session failed", exc_info=exc)
                    self._closing = self._closing or _Closing(1011, "internal error")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.session.close()  # abort engine requests, stop TTS: nothing outlives the socket
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

    def _send(self, event: dict[str, Any]) -> None:
        if self._closing is not None:
            return
        text = json.dumps(event)  # ASCII: nothing a client sent can make the frame unencodable
        limit = self.state.settings.max_send_buffer_bytes
        if self.queued_bytes + len(text) > limit:
            # The client stopped reading: end this session rather than buffer without bound.
            log.warning("send buffer over %d bytes: client is not reading", limit)
            # Keep a reference: the event loop holds tasks only weakly.
            self._close_task = asyncio.ensure_future(self.close(1008, "client is not reading events (send buffer full)"))
            return
        self.queued_bytes += len(text)
        self.send_queue.put_nowait(text)

    def _error(self, code: str, message: str, param: str | None = None, event_id: str | None = None) -> None:
        self.state.metrics.errors.labels(code=code).inc()
        self._send(error_event(code, message, param, event_id))

    # --- client → session -----------------------------------------------------------------------

    async def _read(self) -> None:
        limit = self.state.settings.max_event_bytes
        idle = self.state.settings.idle_timeout_s
        while True:
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
                self._error("binary_not_supported", "send JSON text events; binary frames are not accepted")
                continue
            size = len(text) if len(text) * 4 <= limit else len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                self._error("event_too_large", f"event of {size} bytes exceeds the limit of {limit} bytes")
                continue
            try:
                self._handle(parse_client_event(text))
            except ProtocolError as exc:
                self.state.metrics.errors.labels(code=exc.code).inc()
                self._send(exc.event())
            except ValueError as exc:
                # Input the parser let through but the session refuses: a bug in the parser's checks, yet the
                # client's fault too. Answer it and keep the session (the traceback goes to the log).
                log.warning("event refused past the parser", exc_info=exc)
                self._error("invalid_value", str(exc)[:500])

    def _handle(self, event: Any) -> None:
        handler = {
            SessionUpdate: self._on_session_update,
            AudioAppend: self._on_append,
            AudioCommit: self._on_commit,
            AudioClear: self._on_clear,
            ItemCreate: self._on_item_create,
            ItemTruncate: self._on_truncate,
            ItemDelete: self._on_delete,
            ResponseCreate: self._on_response_create,
            ResponseCancel: self._on_response_cancel,
            FrameAppend: self._on_frame,
            TextAppend: lambda e: self.session.send_text(e.text),
        }[type(event)]
        handler(event)

    def _on_session_update(self, event: SessionUpdate) -> None:
        cfg = event.session
        if cfg.instructions is not None:
            _check_instructions(cfg.instructions, "session.instructions", event.event_id)
        try:
            fmt_in = cfg.input_audio_format or (cfg.audio and cfg.audio.input and cfg.audio.input.format)
            fmt_out = cfg.output_audio_format or (cfg.audio and cfg.audio.output and cfg.audio.output.format)
            new_in = AudioFormat.parse(fmt_in) if fmt_in else self.fmt_in
            new_out = AudioFormat.parse(fmt_out) if fmt_out else self.fmt_out
        except AudioFormatError as exc:
            raise ProtocolError("invalid_audio_format", str(exc), "session.audio", event.event_id) from None
        if new_in != self.fmt_in:
            self.fmt_in, self.to_16k = new_in, StreamResampler(new_in.rate, 16000)
        self.fmt_out = new_out
        modalities = cfg.modalities_given()
        if modalities:
            if "audio" in modalities and isinstance(self.tts_factory(), TextOnlyTTS):
                self._error("audio_output_unavailable", "this server has no speech output; answering in text",
                            "session.output_modalities", event.event_id)
                modalities = ["text"]
            self.modalities = ["audio"] if "audio" in modalities else ["text"]
        voice = cfg.voice or (cfg.audio and cfg.audio.output and cfg.audio.output.voice)
        if voice:
            self.voice = voice
        given, detection = cfg.turn_detection_given()
        update: dict[str, Any] = {"audio_output": "audio" in self.modalities}
        if given:
            if detection is not None and detection.type == "semantic_vad":
                self._error("unsupported_turn_detection", "semantic_vad is not supported; using server_vad",
                            "session.turn_detection.type", event.event_id)
                detection = detection.model_copy(update={"type": "server_vad"})
            if detection is not None:
                merged = (self.turn_detection or TurnDetection()).model_copy(
                    update={k: v for k, v in detection.model_dump().items() if v is not None}
                )
                self.turn_detection = merged
                self.session.set_vad_params(self._vad_params())
                update["interrupt_response"] = merged.interrupt_response is not False
                update["create_response"] = merged.create_response is not False
            else:
                self.turn_detection = None  # manual turns: commit + response.create
                self.session.set_vad_params(None)
        if cfg.instructions is not None:
            self.instructions = cfg.instructions
            update["instructions"] = cfg.instructions
        budget = cfg.max_output_tokens if cfg.max_output_tokens is not None else cfg.max_response_output_tokens
        if budget is not None:
            # The server's max_tokens is the ceiling ("inf" means it): one session must not hold an
            # engine for as long as it likes.
            ceiling = self.state.settings.max_tokens
            self.max_output_tokens = ceiling if budget == "inf" else min(budget, ceiling)
            self.session.set_max_tokens(self.max_output_tokens)
        self.session.feed(SessionUpdated(**update))
        self._send(self._session_event("session.updated"))

    def _on_append(self, event: AudioAppend) -> None:
        try:
            raw = decode_base64(event.audio)
            samples = self.to_16k(decode(raw, self.fmt_in))
        except AudioFormatError as exc:
            raise ProtocolError("invalid_audio", f"{exc}; expected base64 {self._fmt_text()}", "audio",
                                event.event_id) from None
        if self.turn_detection is not None:
            self.session.push_audio(samples)
            return
        limit = int(self.state.settings.max_buffered_audio_s * 16000)
        if self.manual_samples + len(samples) > limit:
            raise ProtocolError("input_audio_buffer_full",
                                f"the input audio buffer holds at most {self.state.settings.max_buffered_audio_s:.0f}"
                                " s; commit or clear it", "audio", event.event_id)
        self.manual_audio.append(samples)
        self.manual_samples += len(samples)

    def _on_commit(self, event: AudioCommit) -> None:
        if self.turn_detection is not None:
            if not self.session.flush_speech():
                raise ProtocolError("input_audio_buffer_commit_empty", "no speech in progress to commit",
                                    None, event.event_id)
            return
        if self.manual_samples < 1600:
            raise ProtocolError("input_audio_buffer_commit_empty",
                                "the input audio buffer has less than 100 ms of audio", None, event.event_id)
        audio = np.concatenate(self.manual_audio)
        self.manual_audio, self.manual_samples = [], 0
        item_id = "item_" + uuid.uuid4().hex[:20]
        self._send({"type": "input_audio_buffer.committed", "item_id": item_id,
                    "previous_item_id": self.last_item_id})
        self._announce_user_item(item_id, [{"type": "input_audio", "transcript": None}])
        self.session.feed(UserItem((InputAudio(audio),)))

    def _on_clear(self, event: AudioClear) -> None:
        self.manual_audio, self.manual_samples = [], 0
        if self.turn_detection is not None:
            self.session.set_vad_params(self._vad_params())  # a fresh VAD stream drops buffered audio
        self._send({"type": "input_audio_buffer.cleared"})

    def _on_item_create(self, event: ItemCreate) -> None:
        item = event.item
        if item.role == "system":
            texts = [p.text for p in item.content if p.text]
            instructions = "\n".join(filter(None, [self.instructions, *texts]))
            _check_instructions(instructions, "item.content", event.event_id)
            self.instructions = instructions
            self.session.feed(SessionUpdated(instructions=self.instructions))
        elif item.role != "user":
            raise ProtocolError("unsupported_item", "only user and system messages can be added; VITA's "
                                "history keeps its own assistant turns", "item.role", event.event_id)
        parts: list[InputText | InputAudio | InputImage] = []
        for i, part in enumerate(item.content):
            param = f"item.content.{i}"
            if part.type in ("input_text", "text") and part.text:
                parts.append(InputText(part.text))
            elif part.type == "input_audio" and part.audio:
                try:
                    parts.append(InputAudio(self.to_16k_once(decode(decode_base64(part.audio), self.fmt_in))))
                except AudioFormatError as exc:
                    raise ProtocolError("invalid_audio", str(exc), param, event.event_id) from None
            elif part.type == "input_image" and part.image_url:
                parts.append(InputImage(self._decode_image(part.image_url, param, event.event_id)))
            else:
                raise ProtocolError("invalid_content", f"{part.type} part is missing its data", param, event.event_id)
        if item.role == "system":
            self._send({"type": "conversation.item.added", "item": self._item_json(item.id, "system", [])})
            return
        item_id = item.id or "item_" + uuid.uuid4().hex[:20]
        self._announce_user_item(item_id, [p.model_dump(exclude_none=True) for p in item.content])
        self.session.feed(UserItem(tuple(parts)))

    def to_16k_once(self, samples: np.ndarray) -> np.ndarray:
        """A whole clip (an item's audio): equal to resampling it offline, as upstream does."""
        resampler = StreamResampler(self.fmt_in.rate, 16000)
        return np.concatenate([resampler(samples), resampler.flush()])

    def _on_truncate(self, event: ItemTruncate) -> None:
        response_id = self.item_to_response.get(event.item_id)
        if response_id is None:
            raise ProtocolError("item_not_found", f"no assistant item {event.item_id!r} in this session",
                                "item_id", event.event_id)
        self.session.truncate(response_id, event.audio_end_ms)

    def _on_delete(self, event: ItemDelete) -> None:
        raise ProtocolError("item_delete_unsupported", "VITA keeps a short rolling history; items cannot be "
                            "deleted (use session.update to change instructions)", "item_id", event.event_id)

    def _on_response_create(self, event: ResponseCreate) -> None:
        wanted = event.response.output_modalities or event.response.modalities
        if wanted:
            self.next_modalities = ["audio"] if "audio" in wanted else ["text"]
        self.session.feed(ResponseRequested(instructions=event.response.instructions))

    def _on_response_cancel(self, event: ResponseCancel) -> None:
        self.session.cancel_response(event.response_id)

    def _on_frame(self, event: FrameAppend) -> None:
        self.session.push_frame(self._decode_image(event.image, "image", event.event_id))

    def _decode_image(self, data: str, param: str, event_id: str | None) -> Image.Image:
        if data.startswith("data:"):
            _, _, data = data.partition(",")
        elif data.startswith(("http://", "https://", "file:")):  # (bare base64 JPEG starts with "/9j/")
            raise ProtocolError("invalid_image", "send images inline as base64 or a data: URL; remote URLs "
                                "and file paths are not fetched", param, event_id)
        try:
            return decode_image(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError) as exc:
            message = str(exc) if isinstance(exc, InvalidImageError) else f"image is not valid base64: {exc}"
            raise ProtocolError("invalid_image", message, param, event_id) from None

    # --- session → client -----------------------------------------------------------------------

    async def _translate(self) -> None:
        while True:
            action = await self.session.outbound.get()
            for event in self._events_for(action):
                self._send(event)

    def _events_for(self, action: Any) -> list[dict[str, Any]]:
        if isinstance(action, SpeechStartedNotice):
            self.speech_started_at = time.monotonic()
            item_id = self.segment_items.setdefault(action.segment_id, "item_" + uuid.uuid4().hex[:20])
            return [{"type": "input_audio_buffer.speech_started", "audio_start_ms": action.sample // 16,
                     "item_id": item_id}]
        if isinstance(action, SpeechStoppedNotice):
            self.speech_stopped_at = time.monotonic()
            item_id = self.segment_items.setdefault(action.segment_id, "item_" + uuid.uuid4().hex[:20])
            out = [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": action.sample // 16,
                    "item_id": item_id}]
            if not action.committed:
                out.append({"type": "vita.segment.discarded", "item_id": item_id})
            return out
        if isinstance(action, SegmentClassified):
            return self._classified(action)
        if isinstance(action, ResponseStarted):
            return self._response_started(action)
        if isinstance(action, EmitText):
            return self._text_delta(action)
        if isinstance(action, EmitAudio):
            return self._audio_delta(action)
        if isinstance(action, PauseOutput):
            if self.speech_started_at is not None:
                self.state.metrics.barge_in.observe(time.monotonic() - self.speech_started_at)
            return [{"type": "vita.output.paused", "response_id": action.response_id}]
        if isinstance(action, ResumeOutput):
            return [{"type": "vita.output.resumed", "response_id": action.response_id}]
        if isinstance(action, ClearOutput):
            return [{"type": "output_audio_buffer.cleared", "response_id": action.response_id}]
        if isinstance(action, ResponseDone):
            return self._response_done(action)
        if isinstance(action, ResponseTruncated):
            wire = self.responses.get(action.response_id)
            item_id = wire.item_id if wire else "item_" + action.response_id
            return [{"type": "conversation.item.truncated", "item_id": item_id, "content_index": 0,
                     "audio_end_ms": action.audio_end_ms}]
        if isinstance(action, RolesSwapped):
            return [{"type": "vita.roles.swapped", "generator": action.generator, "monitor": action.monitor}]
        if isinstance(action, Error):
            self.state.metrics.errors.labels(code=action.code).inc()
            return [error_event(action.code, action.message)]
        return []

    def _classified(self, action: SegmentClassified) -> list[dict[str, Any]]:
        item_id = self.segment_items.setdefault(action.segment_id, "item_" + uuid.uuid4().hex[:20])
        event: dict[str, Any] = {
            "type": "vita.segment.classified", "item_id": item_id, "kind": action.kind,
            "ignored": action.ignored, "reason": action.reason,
        }
        if action.start_sample is not None:
            event["audio_start_ms"] = action.start_sample // 16
            event["audio_end_ms"] = (action.end_sample or 0) // 16
        out = [event]
        if not action.ignored and action.start_sample is not None:  # a spoken turn joins the conversation
            out.append({"type": "input_audio_buffer.committed", "item_id": item_id,
                        "previous_item_id": self.last_item_id})
            out += self._user_item_events(item_id, [{"type": "input_audio", "transcript": None}])
        return out

    def _announce_user_item(self, item_id: str, content: list[dict[str, Any]]) -> None:
        for event in self._user_item_events(item_id, content):
            self._send(event)

    def _user_item_events(self, item_id: str, content: list[dict[str, Any]]) -> list[dict[str, Any]]:
        item = self._item_json(item_id, "user", content, status="completed")
        previous, self.last_item_id = self.last_item_id, item_id
        return [{"type": "conversation.item.added", "previous_item_id": previous, "item": item},
                {"type": "conversation.item.done", "previous_item_id": previous, "item": item}]

    def _response_started(self, action: ResponseStarted) -> list[dict[str, Any]]:
        modalities = self.next_modalities or self.modalities
        self.next_modalities = None
        wire = _ResponseWire(action.response_id, "item_" + uuid.uuid4().hex[:20], modalities)
        self.responses[action.response_id] = wire
        self.item_to_response[wire.item_id] = action.response_id
        part = {"type": "audio", "transcript": ""} if "audio" in modalities else {"type": "text", "text": ""}
        item = self._item_json(wire.item_id, "assistant", [], status="in_progress")
        previous, self.last_item_id = self.last_item_id, wire.item_id
        return [
            {"type": "response.created", "response": self._response_json(wire, "in_progress")},
            {"type": "response.output_item.added", "response_id": wire.response_id, "output_index": 0, "item": item},
            {"type": "conversation.item.added", "previous_item_id": previous, "item": item},
            {"type": "response.content_part.added", "response_id": wire.response_id, "item_id": wire.item_id,
             "output_index": 0, "content_index": 0, "part": part},
        ]

    def _text_delta(self, action: EmitText) -> list[dict[str, Any]]:
        wire = self.responses.get(action.response_id)
        if wire is None or not action.delta:
            return []
        if wire.first_delta_at is None:
            wire.first_delta_at = time.monotonic()
            if self.speech_stopped_at is not None:
                self.state.metrics.ttft.observe(wire.first_delta_at - self.speech_stopped_at)
        wire.text += action.delta
        kind = "response.output_audio_transcript.delta" if "audio" in wire.modalities else "response.output_text.delta"
        return [{"type": kind, "response_id": wire.response_id, "item_id": wire.item_id, "output_index": 0,
                 "content_index": 0, "delta": action.delta}]

    def _audio_delta(self, action: EmitAudio) -> list[dict[str, Any]]:
        wire = self.responses.get(action.response_id)
        if wire is None or "audio" not in wire.modalities:
            return []
        pcm = np.asarray(action.pcm, dtype=np.float32)[action.offset : action.offset + action.num_samples]
        if self.fmt_out.rate != OUTPUT_RATE:
            resampler = StreamResampler(OUTPUT_RATE, self.fmt_out.rate)
            pcm = np.concatenate([resampler(pcm), resampler.flush()])
        wire.audio_ms += 1000 * action.num_samples / OUTPUT_RATE
        data = base64.b64encode(encode(pcm, self.fmt_out)).decode()
        return [{"type": "response.output_audio.delta", "response_id": wire.response_id, "item_id": wire.item_id,
                 "output_index": 0, "content_index": 0, "delta": data}]

    def _response_done(self, action: ResponseDone) -> list[dict[str, Any]]:
        wire = self.responses.get(action.response_id)
        if wire is None:
            return []
        ids = {"response_id": wire.response_id, "item_id": wire.item_id, "output_index": 0, "content_index": 0}
        out: list[dict[str, Any]] = []
        if "audio" in wire.modalities:
            out.append({"type": "response.output_audio.done", **ids})
            out.append({"type": "response.output_audio_transcript.done", **ids, "transcript": wire.text})
            part = {"type": "audio", "transcript": wire.text}
        else:
            out.append({"type": "response.output_text.done", **ids, "text": wire.text})
            part = {"type": "text", "text": wire.text}
        item_status = "completed" if action.status == "completed" else "incomplete"
        item = self._item_json(wire.item_id, "assistant", [part], status=item_status)
        out += [
            {"type": "response.content_part.done", **ids, "part": part},
            {"type": "response.output_item.done", "response_id": wire.response_id, "output_index": 0, "item": item},
            {"type": "conversation.item.done", "item": item},
            {"type": "response.done", "response": self._response_json(wire, action.status, action.reason, item)},
        ]
        return out

    # --- JSON shapes ----------------------------------------------------------------------------

    def _item_json(self, item_id: str | None, role: str, content: list[dict[str, Any]],
                   status: str = "completed") -> dict[str, Any]:
        return {"id": item_id, "object": "realtime.item", "type": "message", "role": role, "status": status,
                "content": content}

    def _response_json(self, wire: _ResponseWire, status: str, reason: str | None = None,
                       item: dict[str, Any] | None = None) -> dict[str, Any]:
        details = None
        if status != "in_progress" and status != "completed":
            details = {"type": status, "reason": reason}
        return {"id": wire.response_id, "object": "realtime.response", "status": status,
                "status_details": details, "output": [item] if item else [],
                "output_modalities": wire.modalities, "conversation_id": self.session_id}

    def _session_event(self, kind: str) -> dict[str, Any]:
        detection = None if self.turn_detection is None else {
            "type": "server_vad", **self.turn_detection.model_dump(exclude={"type", "eagerness"}, exclude_none=True)
        }
        return {"type": kind, "session": {
            "type": "realtime", "id": self.session_id, "object": "realtime.session",
            "model": self.state.pool.model_id, "instructions": self.instructions or "",
            "output_modalities": self.modalities, "max_output_tokens": self.max_output_tokens,
            "audio": {
                "input": {"format": self.fmt_in.to_ga(), "turn_detection": detection},
                "output": {"format": self.fmt_out.to_ga(), "voice": self.voice},
            },
            "vita": {"engines": len(self.state.pool.engines),
                     "extensions": ["vita.frame.append", "vita.text.append", "vita.segment.classified",
                                    "vita.output.paused", "vita.output.resumed", "vita.roles.swapped"]},
        }}

    def _fmt_text(self) -> str:
        f = self.fmt_in
        return f"PCM16 mono at {f.rate} Hz" if f.encoding == "pcm16" else f"G.711 {f.encoding} at 8000 Hz"

    def _vad_params(self) -> VadParams:
        s, d = self.state.settings, self.turn_detection or TurnDetection()
        return VadParams(
            threshold=d.threshold if d.threshold is not None else s.vad_threshold,
            prefix_padding_ms=float(d.prefix_padding_ms if d.prefix_padding_ms is not None else s.vad_prefix_padding_ms),
            silence_duration_ms=float(
                d.silence_duration_ms if d.silence_duration_ms is not None else s.vad_silence_duration_ms
            ),
            min_speech_ms=float(s.vad_min_speech_ms),
            max_speech_ms=s.max_buffered_audio_s * 1000,
        )


def _check_instructions(text: str, param: str, event_id: str | None) -> None:
    if len(text) > MAX_INSTRUCTIONS_CHARS:
        raise ProtocolError("instructions_too_long", f"instructions would be {len(text)} characters; the "
                            f"limit is {MAX_INSTRUCTIONS_CHARS} (system items add to them)", param, event_id)
