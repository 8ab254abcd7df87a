"""A thin typed async client for vita-duplex's `WS /v1/realtime` (OpenAI Realtime protocol + `vita.*` events).

    async with RealtimeClient.connect("http://127.0.0.1:8000", api_key=key) as rt:
        await rt.update_session(output_modalities=["audio"])
        await rt.append_audio_float(samples, 16000)
        async for event in rt.events():
            if event.type == "response.done":
                break

Outgoing events are built with the protocol's own pydantic models (`server/wire/client_events.py`), so a malformed call
fails here with pydantic's message instead of as an `error` event one round trip later. Server `error`
events are yielded like any other event (see `ServerEvent.error`); only a closed socket ends `events()`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np
import soxr
import websockets
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedOK,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)

from server.wire.audio_codec import AudioFormat, AudioFormatError, encode
from server.wire.client_events import (
    AudioAppend,
    AudioClear,
    AudioCommit,
    ContentPart,
    FrameAppend,
    Item,
    ItemCreate,
    ItemTruncate,
    ResponseCancel,
    ResponseConfig,
    ResponseCreate,
    SessionConfig,
    SessionUpdate,
    TextAppend,
)

__all__ = [
    "AuthenticationFailed",
    "ConnectFailed",
    "ConnectionLost",
    "RealtimeClient",
    "RealtimeError",
    "ServerError",
    "ServerEvent",
    "ServerUnavailable",
    "image_data_url",
    "realtime_url",
]

SESSION_FORMAT = AudioFormat("pcm16", 24000)  # the protocol's default until session.created says otherwise
MAX_APPEND_BYTES = 1 << 18  # per input_audio_buffer.append: ~5 s of 24 kHz PCM16, far below the event limit
MAX_MESSAGE_BYTES = 16 << 20


# --- errors -------------------------------------------------------------------------------------------


class RealtimeError(Exception):
    """Base of this client's errors."""


class ConnectFailed(RealtimeError):
    """Nothing answered at the URL, or it did not speak WebSocket there."""


class AuthenticationFailed(RealtimeError):
    """The server refused the API key (close code 1008, or HTTP 401 from a proxy)."""


class ServerUnavailable(RealtimeError):
    """The server is at capacity or its engines are still loading (close code 1013): retry later."""


class ConnectionLost(RealtimeError):
    """The socket closed abnormally during the session."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection closed (code {code}): {reason or 'no reason given'}")
        self.code, self.reason = code, reason


def _closed_error(exc: ConnectionClosed) -> RealtimeError:
    """Map a close frame to the error that tells the user what to do."""
    code, reason = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")
    if code == 1008 and "key" in reason.lower():
        return AuthenticationFailed(reason)
    if code == 1013:
        return ServerUnavailable(reason or "server unavailable")
    return ConnectionLost(code, reason)


# --- server events ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerError:
    """The `error` field of a server `error` event."""

    message: str
    code: str | None = None
    type: str | None = None
    param: str | None = None
    event_id: str | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.message}" if self.code else self.message


@dataclass(frozen=True)
class ServerEvent:
    """One parsed server event: `type` plus the raw JSON object, with accessors for the common fields."""

    type: str
    data: Mapping[str, Any]

    @classmethod
    def from_json(cls, text: str | bytes) -> ServerEvent:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RealtimeError(f"the server sent an event that is not JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise RealtimeError(f"the server sent an event without a 'type': {str(data)[:200]}")
        return cls(data["type"], data)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    @property
    def response_id(self) -> str | None:
        """The response an event belongs to (`response_id`, or `response.id` on response.created/done)."""
        response = self.data.get("response")
        return self.data.get("response_id") or (response.get("id") if isinstance(response, dict) else None)

    @property
    def error(self) -> ServerError | None:
        if self.type != "error":
            return None
        err = self.data.get("error") or {}
        return ServerError(
            message=str(err.get("message", "")), code=err.get("code"), type=err.get("type"),
            param=err.get("param"), event_id=err.get("event_id"),
        )

    @property
    def audio(self) -> bytes:
        """Decoded bytes of a `response.output_audio.delta` (in the session's output format); b"" otherwise."""
        if self.type not in ("response.output_audio.delta", "response.audio.delta"):
            return b""
        return base64.b64decode(self.data.get("delta") or "")


# --- the client ---------------------------------------------------------------------------------------


def realtime_url(base_url: str, model: str | None = "vita") -> str:
    """`http(s)://host[:port][/prefix]` (or ws/wss) → `ws(s)://host[:port][/prefix]/v1/realtime?model=…`."""
    parts = urlsplit(base_url.strip())
    schemes = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}
    if parts.scheme not in schemes or not parts.netloc:
        raise ValueError(f"server URL must look like http://host:port or https://host; got {base_url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith("/v1/realtime"):
        path += "/realtime" if path.endswith("/v1") else "/v1/realtime"
    query = urlencode({"model": model}) if model else parts.query
    return urlunsplit((schemes[parts.scheme], parts.netloc, path, query, ""))


class RealtimeClient:
    """One realtime session. Create it with `RealtimeClient.connect(...)`; every method sends one or two events."""

    def __init__(self, ws: ClientConnection, url: str, session: Mapping[str, Any]) -> None:
        self.url = url
        self.session: dict[str, Any] = dict(session)  # the latest session.created / session.updated body
        self._ws = ws
        self._pending: collections.deque[ServerEvent] = collections.deque()
        self._input_format = _input_format_of(session)
        self._resampler: soxr.ResampleStream | None = None
        self._resampler_rates: tuple[int, int] | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, base_url: str, api_key: str | None = None, model: str = "vita", open_timeout: float = 10.0
    ) -> AsyncIterator[RealtimeClient]:
        """Open a session and wait for `session.created`, so a bad key or a full server fails here."""
        url = realtime_url(base_url, model)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        ws = await _open(url, headers, open_timeout)
        try:
            client = cls(ws, url, {})
            await client._await_session(open_timeout)
            yield client
        finally:
            await ws.close()

    async def _await_session(self, timeout: float) -> None:
        """The server accepts the socket first and then closes it if the key is wrong: read the first event."""
        first = await self._recv(timeout)
        if first is None:
            raise ConnectionLost(1000, "the server closed the session before session.created")
        if first.type == "error":  # e.g. engines_not_ready, followed by a 1013 close
            with contextlib.suppress(RealtimeError, asyncio.TimeoutError):
                await self._recv(timeout)
            raise ServerUnavailable(str(first.error))
        self._observe(first)
        self._pending.append(first)

    async def _recv(self, timeout: float | None = None) -> ServerEvent | None:
        """The next event, or None on a normal close; abnormal closes raise the matching RealtimeError."""
        while True:
            try:
                async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel on 3.11
                    raw = await self._ws.recv()
            except ConnectionClosedOK:
                return None
            except ConnectionClosed as exc:
                raise _closed_error(exc) from None
            if isinstance(raw, str):  # the protocol is JSON text; binary frames carry nothing here
                return ServerEvent.from_json(raw)

    async def events(self) -> AsyncIterator[ServerEvent]:
        """Server events as they arrive, `error` events included; ends when the server closes normally."""
        while self._pending:
            yield self._pending.popleft()
        while (event := await self._recv()) is not None:
            self._observe(event)
            yield event

    def _observe(self, event: ServerEvent) -> None:
        if event.type in ("session.created", "session.updated") and isinstance(event.get("session"), dict):
            self.session = dict(event["session"])
            if event.type == "session.created":  # later formats come from our own update_session calls
                self._input_format = _input_format_of(self.session)

    # --- sending --------------------------------------------------------------------------------------

    async def _send(self, event: BaseModel) -> None:
        # exclude_unset keeps what the caller set, including an explicit `turn_detection: null` (manual turns)
        try:
            await self._ws.send(event.model_dump_json(exclude_unset=True))
        except ConnectionClosed as exc:
            raise _closed_error(exc) from None

    async def update_session(self, **fields: Any) -> None:
        """`session.update` with GA or beta fields, e.g. `output_modalities=["text"]`, `audio={...}`,
        `turn_detection=None` (manual turns: `commit()` then `response.create`)."""
        config = SessionConfig.model_validate({"type": "realtime", **fields})
        spec = config.input_audio_format or (config.audio and config.audio.input and config.audio.input.format)
        if spec:
            self._input_format = AudioFormat.parse(spec)  # the same check the server makes
        await self._send(SessionUpdate(type="session.update", session=config))

    async def append_audio(self, audio: bytes) -> None:
        """Raw audio in the session's input format (PCM16 24 kHz mono by default), split into events."""
        step = MAX_APPEND_BYTES
        for start in range(0, len(audio), step):
            chunk = base64.b64encode(audio[start : start + step]).decode()
            await self._send(AudioAppend(type="input_audio_buffer.append", audio=chunk))

    async def append_audio_float(self, samples: np.ndarray, rate: int) -> None:
        """float32 samples in [-1, 1] at any rate (mono, or channels last): resampled to the session's input
        rate with one streaming soxr resampler, so consecutive chunks join without clicks."""
        audio = np.asarray(samples, dtype=np.float32)
        if audio.ndim == 2:
            audio = audio.mean(axis=1)
        if audio.ndim != 1:
            raise ValueError(f"samples must be mono (n,) or (n, channels); got shape {audio.shape}")
        await self._append_encoded(self._resample(audio, rate, last=False))

    async def _append_encoded(self, samples: np.ndarray) -> None:
        if samples.size:
            await self.append_audio(encode(samples, self._input_format))

    def _resample(self, audio: np.ndarray, rate: int, last: bool) -> np.ndarray:
        rates = (int(rate), self._input_format.rate)
        if rates[0] == rates[1]:
            return audio
        if self._resampler is None or self._resampler_rates != rates:
            self._resampler = soxr.ResampleStream(rates[0], rates[1], 1, dtype="float32")
            self._resampler_rates = rates
        return self._resampler.resample_chunk(audio, last=last)

    async def _flush_resampler(self) -> None:
        """Send the resampler's held-back tail (a few ms) so a commit covers everything appended."""
        if self._resampler is not None and self._resampler_rates is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
            self._resampler, self._resampler_rates = None, None
            await self._append_encoded(tail)

    async def commit(self) -> None:
        """`input_audio_buffer.commit`: end the turn now (manual turns) or the speech in progress (server VAD)."""
        await self._flush_resampler()
        await self._send(AudioCommit(type="input_audio_buffer.commit"))

    async def clear_audio(self) -> None:
        """`input_audio_buffer.clear`: drop audio not yet committed."""
        self._resampler, self._resampler_rates = None, None
        await self._send(AudioClear(type="input_audio_buffer.clear"))

    async def send_text(self, text: str, modalities: list[str] | None = None) -> None:
        """A typed user message and a `response.create` for it (optionally `["text"]` or `["audio"]`)."""
        part = ContentPart(type="input_text", text=text)
        await self._send(ItemCreate(type="conversation.item.create",
                                    item=Item(type="message", role="user", content=[part])))
        await self.create_response(modalities)

    async def create_response(self, modalities: list[str] | None = None, instructions: str | None = None) -> None:
        """`response.create`: answer the conversation now (manual turns, or after a typed item)."""
        fields = {"output_modalities": modalities, "instructions": instructions}
        config = ResponseConfig.model_validate({k: v for k, v in fields.items() if v is not None})
        await self._send(ResponseCreate(type="response.create", response=config))

    async def append_text(self, text: str) -> None:
        """`vita.text.append`: typed text gated like speech (VITA itself decides to answer it)."""
        await self._send(TextAppend(type="vita.text.append", text=text))

    async def send_frame(self, image: bytes | str) -> None:
        """`vita.frame.append`: one camera frame, JPEG/PNG bytes (or a base64 string / data: URL).

        Bytes go as a data: URL rather than bare base64: bare JPEG base64 starts with "/9j/", which a server
        that refuses file paths may read as one."""
        data = image if isinstance(image, str) else image_data_url(image)
        await self._send(FrameAppend(type="vita.frame.append", image=data))

    async def cancel(self, response_id: str | None = None) -> None:
        """`response.cancel`: stop the answer being generated."""
        fields = {"response_id": response_id} if response_id else {}
        await self._send(ResponseCancel.model_validate({"type": "response.cancel", **fields}))

    async def truncate(self, item_id: str, audio_end_ms: int, content_index: int = 0) -> None:
        """`conversation.item.truncate`: the user heard only `audio_end_ms` of this assistant item."""
        await self._send(ItemTruncate(type="conversation.item.truncate", item_id=item_id,
                                      content_index=content_index, audio_end_ms=audio_end_ms))

    async def close(self) -> None:
        await self._ws.close()


async def _open(url: str, headers: dict[str, str], timeout: float) -> ClientConnection:
    """websockets.connect with its failures turned into ConnectFailed / AuthenticationFailed."""
    try:
        return await websockets.connect(url, additional_headers=headers, open_timeout=timeout,
                                        max_size=MAX_MESSAGE_BYTES)
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 401:  # a proxy checking keys; vita-duplex itself closes with 1008 instead
            raise AuthenticationFailed(f"HTTP {status}") from None
        # 403/404 come from a wrong path (Starlette answers 403 to an unknown WebSocket route)
        raise ConnectFailed(f"the WebSocket upgrade at {url} was refused with HTTP {status}: "
                            "is the URL that of a vita-duplex server?") from None
    except InvalidURI as exc:
        raise ConnectFailed(str(exc)) from None
    except (TimeoutError, OSError, InvalidHandshake) as exc:
        raise ConnectFailed(str(exc) or type(exc).__name__) from None


_IMAGE_MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG", "image/png"), (b"GIF8", "image/gif"),
                (b"BM", "image/bmp"))


def image_data_url(data: bytes) -> str:
    """`data:image/…;base64,…` for image bytes, the MIME type sniffed from the magic number."""
    mime = next((m for magic, m in _IMAGE_MAGIC if data.startswith(magic)), None)
    if mime is None:
        mime = "image/webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else "application/octet-stream"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _input_format_of(session: Mapping[str, Any]) -> AudioFormat:
    spec = ((session.get("audio") or {}).get("input") or {}).get("format") or session.get("input_audio_format")
    try:
        return AudioFormat.parse(spec) if spec else SESSION_FORMAT
    except AudioFormatError:
        return SESSION_FORMAT

