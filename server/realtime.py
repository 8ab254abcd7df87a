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
import uuid
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
    SessionUpdated,
    UserItem,
)
from duplex.runtime import DuplexSession, RuntimeSettings, state_tokens_for
from duplex.tts import TextOnlyTTS
from models.engine import Sampling
from models.errors import InvalidImageError
from models.image_tiling import decode_image

from .auth import bearer_token, key_matches, origin_allowed, subprotocol_key
from .logs import session_id_var
from .realtime_config import RealtimeConfig
from .realtime_conversation import OUTPUT_RATE, Conversation, new_item_id
from .resampling import StreamResampler
from .state import AppState
from .wire.audio_codec import AudioFormat, AudioFormatError, decode
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
    TurnDetection,
    parse_client_event,
)
from .wire.errors import ErrorCode, ProtocolError, realtime_error
from .wire.inline_data import InlineDataError, decode_base64, decode_inline
from .wire.items import UserPart
from .wire.server_events import ServerEvent, ServerEventEncoder
from .wire.vita_events import VitaEvent

log = logging.getLogger(__name__)
router = APIRouter()

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
        events = ServerEventEncoder()
        loading = realtime_error(ErrorCode.ENGINES_NOT_READY, "the engines are still loading; retry shortly")
        await ws.send_text(events.encode(events.error(loading)))
        await ws.close(code=1013, reason="engines not ready")
        return
    if state.shutting_down:
        await ws.close(code=1001, reason="server shutting down")
        return
    if not state.try_admit():
        await ws.close(code=1013, reason=f"server at capacity ({settings.max_sessions} sessions)")
        return
    state.metrics.sessions.inc()
    connection = RealtimeConnection(ws, state, vita_events=_flag(ws.query_params.get("vita_events"),
                                                                 default=settings.vita_events))
    state.connections.add(connection)
    try:
        await connection.run()
    finally:
        state.connections.discard(connection)
        state.metrics.sessions.dec()
        state.release()


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
        self.to_16k = StreamResampler(self.config.input_format.rate, 16000)
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
        engines = self.state.pool.engines
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
            engines, self.tts_factory(), self.state.vad, runtime, session_id=self.session_id
        )

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        session_id_var.set(self.session_id)
        log.info("session opened")
        self._send(self.events.new(SessionCreatedEvent, type="session.created", session=self.config.ga_session()))
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
                self._error(ErrorCode.BINARY_NOT_SUPPORTED, "send JSON text events; binary frames are not accepted")
                continue
            size = len(text) if len(text) * 4 <= limit else len(text.encode("utf-8", "surrogatepass"))
            if size > limit:
                self._error(ErrorCode.EVENT_TOO_LARGE, f"event of {size} bytes exceeds the limit of {limit} bytes")
                continue
            try:
                self._handle(parse_client_event(text))
            except ProtocolError as exc:
                self._refuse(exc)
            except ValueError as exc:
                # Input the parser let through but the session refuses: a bug in the parser's checks, yet the
                # client's fault too. Answer it and keep the session (the traceback goes to the log).
                log.warning("event refused past the parser", exc_info=exc)
                self._error(ErrorCode.INVALID_VALUE, str(exc)[:500])

    def _handle(self, event: Any) -> None:
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
            TextAppend: lambda e: self.session.send_text(e.text),
        }[type(event)]
        handler(event)

    def _on_session_update(self, event: SessionUpdate) -> None:
        cfg, config = event.session, self.config
        if cfg.instructions is not None:
            _check_instructions(cfg.instructions, "session.instructions", event.event_id)
        try:
            fmt_in = cfg.input_audio_format or (cfg.audio and cfg.audio.input and cfg.audio.input.format)
            fmt_out = cfg.output_audio_format or (cfg.audio and cfg.audio.output and cfg.audio.output.format)
            new_in = AudioFormat.parse(fmt_in) if fmt_in else config.input_format
            new_out = AudioFormat.parse(fmt_out) if fmt_out else config.output_format
        except AudioFormatError as exc:
            raise ProtocolError(ErrorCode.INVALID_AUDIO_FORMAT, str(exc), "session.audio", event.event_id) from None
        if new_in != config.input_format:
            config.input_format, self.to_16k = new_in, StreamResampler(new_in.rate, 16000)
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
        self.session.feed(SessionUpdated(**update))
        self._send(self.events.new(SessionUpdatedEvent, type="session.updated", session=config.ga_session()))

    def _on_append(self, event: AudioAppend) -> None:
        try:
            raw = decode_base64(event.audio, "audio", allow_empty=True)
            samples = self.to_16k(decode(raw, self.config.input_format))
        except (InlineDataError, AudioFormatError) as exc:
            raise ProtocolError(ErrorCode.INVALID_AUDIO, f"{exc}; expected base64 {self._fmt_text()}", "audio",
                                event.event_id) from None
        if self.config.turn_detection is not None:
            self.session.push_audio(samples)
            return
        limit = int(self.state.settings.max_buffered_audio_s * 16000)
        if self.manual_samples + len(samples) > limit:
            raise ProtocolError(ErrorCode.INPUT_AUDIO_BUFFER_FULL,
                                f"the input audio buffer holds at most {self.state.settings.max_buffered_audio_s:.0f}"
                                " s; commit or clear it", "audio", event.event_id)
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
        self._send_all(self.conversation.audio_committed(new_item_id()))
        self.session.feed(UserItem((InputAudio(audio),)))

    def _on_clear(self, event: AudioClear) -> None:
        self.manual_audio, self.manual_samples = [], 0
        if self.config.turn_detection is not None:  # a fresh VAD stream drops buffered audio
            self.session.set_vad_params(self.config.vad_params(self.state.settings))
        self._send(self.events.new(InputAudioBufferClearedEvent, type="input_audio_buffer.cleared"))

    def _on_item_create(self, event: ItemCreate) -> None:
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
        parts: list[InputText | InputAudio | InputImage] = []
        echoed: list[UserPart] = []  # the item as the conversation shows it: media by kind, not by bytes
        for i, part in enumerate(item.content):
            param = f"item.content.{i}"
            if part.type in ("input_text", "text") and part.text:
                parts.append(InputText(part.text))
                echoed.append({"type": "input_text", "text": part.text})
            elif part.type == "input_audio" and part.audio:
                try:
                    samples = decode(decode_base64(part.audio, "audio"), self.config.input_format)
                except (InlineDataError, AudioFormatError) as exc:
                    raise ProtocolError(ErrorCode.INVALID_AUDIO, str(exc), param, event.event_id) from None
                parts.append(InputAudio(self.to_16k_once(samples)))
                echoed.append({"type": "input_audio", "transcript": None})
            elif part.type == "input_image" and part.image_url:
                parts.append(InputImage(self._decode_image(part.image_url, param, event.event_id)))
                echoed.append({"type": "input_image"})
            else:
                raise ProtocolError(ErrorCode.INVALID_CONTENT, f"{part.type} part is missing its data", param,
                                    event.event_id)
        self._send_all(self.conversation.user_item(item.id or new_item_id(), echoed))
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
        wanted = event.response.output_modalities or event.response.modalities
        if wanted:
            self.conversation.next_modalities = ["audio"] if "audio" in wanted else ["text"]
        self.session.feed(ResponseRequested(instructions=event.response.instructions))

    def _on_response_cancel(self, event: ResponseCancel) -> None:
        self.session.cancel_response(event.response_id)

    def _on_frame(self, event: FrameAppend) -> None:
        self.session.push_frame(self._decode_image(event.image, "image", event.event_id))

    def _decode_image(self, data: str, param: str, event_id: str | None) -> Image.Image:
        if data.startswith(("http://", "https://", "file:")):  # (bare base64 JPEG starts with "/9j/")
            raise ProtocolError(ErrorCode.INVALID_IMAGE, "send images inline as base64 or a data: URL; remote "
                                "URLs and file paths are not fetched", param, event_id)
        try:
            return decode_image(decode_inline(data, "image").data)
        except (InlineDataError, InvalidImageError) as exc:
            raise ProtocolError(ErrorCode.INVALID_IMAGE, str(exc), param, event_id) from None

    # --- session → client -----------------------------------------------------------------------

    async def _translate(self) -> None:
        while True:
            action = await self.session.outbound.get()
            self._send_all(self.conversation.events_for(action))

    def _fmt_text(self) -> str:
        f = self.config.input_format
        return f"PCM16 mono at {f.rate} Hz" if f.encoding == "pcm16" else f"G.711 {f.encoding} at 8000 Hz"


def _flag(value: str | None, default: bool) -> bool:
    """A yes/no query parameter; absent or unreadable: the default."""
    if value is None:
        return default
    return {"1": True, "true": True, "on": True, "yes": True,
            "0": False, "false": False, "off": False, "no": False}.get(value.strip().lower(), default)


def _check_instructions(text: str, param: str, event_id: str | None) -> None:
    if len(text) > MAX_INSTRUCTIONS_CHARS:
        raise ProtocolError(ErrorCode.INSTRUCTIONS_TOO_LONG, f"instructions would be {len(text)} characters; the "
                            f"limit is {MAX_INSTRUCTIONS_CHARS} (system items add to them)", param, event_id)
