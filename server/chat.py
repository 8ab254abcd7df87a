"""POST /v1/chat/completions: OpenAI's chat schema over VITA, streamed (SSE) or not, text and optional speech.

Content parts follow vLLM: `text`, `image_url`, `input_audio`, `video_url` (see server/media.py for which URLs
are read). History is rendered as VITA was trained: earlier user turns keep their text and audio but not their
images or video, earlier replies get back the state token the client never saw, and system/developer
messages extend VITA's own system prompt instead of replacing it.

VITA's first generated token is a state token (☞ query, ☟ noise, ☜ text; <1> <2> <3> on VITA-1.0). It is
dropped from the reply and reported as `vita.state`. With `modalities: ["text", "audio"]` the reply is also
spoken by the server's TTS (24 kHz): one WAV/PCM16 clip in `message.audio`, or PCM16 `delta.audio` chunks
sentence by sentence when streaming (always PCM16 there, as OpenAI streams it). The text is in `content` too, so text-only clients keep working.

A model that cannot hear (no trained audio tower: the embedded demo, a plain text LLM) gets each audio part
as its transcript; one that cannot see gets no images or video, and the response says so in
`vita.notice` (the status stays 200). An answer with no visible text is logged as a warning.

Every request holds an admission slot until its engine request is finished or aborted, including when the
client goes away mid-stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import functools
import io
import json
import logging
import time
import uuid
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sse_starlette import EventSourceResponse
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from duplex.sentences import SentenceChunker
from duplex.transcription import NoTranscription, Transcriber, TranscriptionError
from duplex.tts import TextOnlyTTS, TextToSpeech, float_to_pcm16, resample
from models.config import hears, sees
from models.engine import Delta, EngineInput, Sampling, VitaEngine
from models.errors import EngineUnavailableError, InvalidMediaError, PromptTooLongError
from models.inputs import user_input
from models.prompts import Modality, Turn
from models.state_tokens import (
    STATE_TOKEN_TEXT,
    VisibleText,
    classify_first_token,
    history_state,
    reply_token_budget,
)

from . import limits
from .media import (
    DEFAULT_GEOMETRY,
    FetchPolicy,
    MediaURLRefusedError,
    Offload,
    VisionGeometry,
    decode_input_audio,
    load_image,
    load_video_frames,
)

if TYPE_CHECKING:
    from .settings import ServerSettings
    from .state import AppState

log = logging.getLogger(__name__)

router = APIRouter()

OUTPUT_SAMPLE_RATE = 24_000  # what OpenAI clients expect from audio output
MAX_BODY_BYTES = 64 << 20  # room for a base64 video data URL; media caps in server/media.py are tighter
AUDIO_EXPIRES_S = 3600
SSE_PING_S = 15  # an SSE comment this often while waiting: idle proxies (nginx: 60 s) keep the stream open
PART_TYPES = ("text", "image_url", "input_audio", "video_url")


# --- request schema (unknown fields are ignored, as OpenAI-compatible servers do) ---------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ImageURL(_Model):
    url: str


class ImagePart(_Model):
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(_Model):
    data: str
    format: str


class AudioPart(_Model):
    type: Literal["input_audio"]
    input_audio: InputAudio


class VideoURL(_Model):
    url: str


class VideoPart(_Model):
    type: Literal["video_url"]
    video_url: VideoURL


Part = Annotated[TextPart | ImagePart | AudioPart | VideoPart, Field(discriminator="type")]


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, (str, list)):
            raise ValueError(f"content must be a string or a list of parts of type {', '.join(PART_TYPES)}")
        return value


class StreamOptions(_Model):
    include_usage: bool = False


class AudioOutput(_Model):
    voice: str = "alloy"  # the server's TTS voice is configured by the operator; accepted for compatibility
    format: Literal["wav", "pcm16"] = "wav"


class ChatRequest(_Model):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    modalities: list[Literal["text", "audio"]] | None = None
    audio: AudioOutput | None = None
    n: int | None = None

    @property
    def wants_audio(self) -> bool:
        return "audio" in (self.modalities or ())


# --- errors ---------------------------------------------------------------------------------------------


@dataclass
class RequestError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    status: int
    message: str
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def _param(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as OpenAI writes params ("messages[0].content[1].image_url.url"), without
    pydantic's union-branch names ("str", "list[...]") and part-type tags."""
    out, previous = "", None
    for item in loc:
        if isinstance(item, int):
            out += f"[{item}]"
        elif "[" in item or item in ("str", "none") or (isinstance(previous, int) and item in PART_TYPES):
            pass
        else:
            out += f".{item}" if out else item
        previous = item
    return out


def _validation_error(exc: ValidationError) -> RequestError:
    # A union reports every branch; the deepest location is the branch the client meant.
    err = max(exc.errors(), key=lambda e: len(e["loc"]))
    param = _param(tuple(err["loc"]))
    message = str(err["msg"]).removeprefix("Value error, ")
    return RequestError(400, f"{param}: {message}" if param else message, "invalid_request", param or None)


# --- reading and checking a request ----------------------------------------------------------------------


async def _read_request(request: Request, run: Offload = asyncio.to_thread) -> ChatRequest:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(
            413, f"request body is over the {MAX_BODY_BYTES >> 20} MiB limit", "request_too_large"
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise RequestError(
                413, f"request body is over the {MAX_BODY_BYTES >> 20} MiB limit", "request_too_large"
            )
    # Parsing MBs of JSON (a media data URL) takes a while: off the event loop then.
    return await run(_parse_request, body) if len(body) > limits.OFFLOAD_EVENT_BYTES else _parse_request(body)


def _parse_request(body: bytes | bytearray) -> ChatRequest:
    try:
        data = json.loads(body)
        json.dumps(data, ensure_ascii=False).encode()  # lone surrogates are JSON but not text
    except (ValueError, RecursionError, UnicodeError) as exc:  # also 5000-digit ints and deep nesting
        raise RequestError(400, f"request body must be JSON text: {str(exc)[:200]}", "invalid_json") from None
    if not isinstance(data, dict):
        raise RequestError(400, "request body must be a JSON object", "invalid_json")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    _check(req)
    return req


def _text_chars(req: ChatRequest) -> int:
    """Characters of typed text in all messages (what tokenization costs)."""
    total = 0
    for message in req.messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content is not None:
            total += sum(len(part.text) for part in message.content if isinstance(part, TextPart))
    return total


def _check(req: ChatRequest) -> None:
    problem = limits.text_problem(_text_chars(req), "the messages' text")
    if problem is not None:  # refused before it is tokenized (OpenAI's code for a string over its limit)
        raise RequestError(400, problem, "string_above_max_length", "messages")
    if req.n not in (None, 1):
        raise RequestError(
            400, f"n must be 1 (VITA returns one choice per request); got {req.n}", "invalid_value", "n"
        )
    if req.modalities is not None and set(req.modalities) not in ({"text"}, {"text", "audio"}):
        raise RequestError(
            400,
            f'modalities must be ["text"] or ["text", "audio"]; got {req.modalities}',
            "invalid_value",
            "modalities",
        )
    if req.messages[-1].role != "user":
        raise RequestError(
            400,
            f"the last message must be from the user (VITA answers a user turn); got {req.messages[-1].role!r}",
            "invalid_value",
            "messages",
        )


# --- prompt: OpenAI messages -> VITA turns + media -------------------------------------------------------


@dataclass
class _UserTurn:
    texts: list[str] = field(default_factory=list)
    audios: list[np.ndarray] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    frames: list[Image.Image] = field(default_factory=list)


def _media_error(exc: ValueError, param: str) -> RequestError:
    code = "media_url_refused" if isinstance(exc, MediaURLRefusedError) else "invalid_media"
    return RequestError(400, f"{param}: {exc}", code, param)


def _plain_text(message: Message, index: int) -> str:
    """System, developer and assistant content: a string or text parts only."""
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    texts = []
    for j, part in enumerate(message.content):
        if not isinstance(part, TextPart):
            param = f"messages[{index}].content[{j}]"
            raise RequestError(
                400,
                f"{param}: {message.role} messages take only text parts; got {part.type!r}",
                "invalid_value",
                param,
            )
        texts.append(part.text)
    return "\n".join(texts)


async def _add_user_message(
    turn: _UserTurn, message: Message, index: int, settings: ServerSettings, *, with_vision: bool,
    run: Offload = asyncio.to_thread, geometry: VisionGeometry = DEFAULT_GEOMETRY,
    hear: Callable[[np.ndarray], Awaitable[str]] | None = None,
) -> None:
    """Decode one user message into `turn`. Vision is skipped (not even fetched) unless `with_vision`.
    Decoding runs through `run` (the server's bounded executor), never on the event loop. With `hear`
    (a model that cannot hear), each audio part becomes its transcript, after the text before it."""
    if isinstance(message.content, str) or message.content is None:
        turn.texts.append(message.content or "")
        return
    policy = FetchPolicy.of(settings.media_url_allowlist)
    for j, part in enumerate(message.content):
        param = f"messages[{index}].content[{j}]"
        try:
            if isinstance(part, TextPart):
                turn.texts.append(part.text)
            elif isinstance(part, AudioPart):
                clip = await run(
                    decode_input_audio,
                    part.input_audio.data,
                    part.input_audio.format,
                    settings.max_buffered_audio_s,
                )
                if hear is None:
                    turn.audios.append(clip)
                else:
                    turn.texts.append(await hear(clip))
            elif isinstance(part, ImagePart) and with_vision:
                turn.images.append(await load_image(part.image_url.url, policy, geometry, run))
            elif isinstance(part, VideoPart) and with_vision:
                if turn.frames:
                    raise InvalidMediaError("one video per turn is accepted")
                turn.frames.extend(await load_video_frames(part.video_url.url, policy, geometry.image_size, run))
        except ValueError as exc:  # InvalidMediaError and its subclasses included
            raise _media_error(exc, param) from None


async def build_prompt(
    req: ChatRequest, engine: VitaEngine, settings: ServerSettings, run: Offload = asyncio.to_thread,
    transcriber: Transcriber | None = None,
) -> EngineInput:
    """Messages → one VITA prompt. Consecutive messages of one role merge into one turn. Media decoding and
    the tokenization of a long prompt run through `run` (the server's bounded executor).

    A model that cannot hear (no trained audio tower) gets each audio part as its transcript (`transcriber`);
    one that cannot see gets no images or video (`vision_notice` says so in the response)."""
    decode: dict[str, Any] = {"run": run, "geometry": VisionGeometry.of(engine.config)}
    if not hears(engine.config):
        decode["hear"] = functools.partial(_transcript, transcriber or NoTranscription())
    system_texts: list[str] = []
    blocks: list[tuple[str, list[int]]] = []  # (role, message indices)
    for i, message in enumerate(req.messages):
        if message.role in ("system", "developer"):
            system_texts.append(_plain_text(message, i))
        elif blocks and blocks[-1][0] == message.role:
            blocks[-1][1].append(i)
        else:
            blocks.append((message.role, [i]))

    history: list[Turn] = []
    history_audios: list[np.ndarray] = []
    last_user_had_audio = False
    for role, indices in blocks[:-1]:
        if role == "assistant":
            text = "\n".join(_plain_text(req.messages[i], i) for i in indices)
            # As VITA was trained to see it: after its state token, which the client never saw. The
            # client's text stays plain text (a typed "<2>" or "<|im_end|>" forges nothing).
            state = history_state(last_user_had_audio) if engine.state_tokens is not None else None
            history.append(Turn("assistant", text=text, state=state))
            continue
        past = _UserTurn()
        for i in indices:  # VITA drops images and video from history: only text and audio come back
            await _add_user_message(past, req.messages[i], i, settings, with_vision=False, **decode)
        history.append(Turn("user", text="\n".join(t for t in past.texts if t), audios=len(past.audios)))
        history_audios += past.audios
        last_user_had_audio = bool(past.audios)

    now = _UserTurn()
    for i in blocks[-1][1]:
        await _add_user_message(now, req.messages[i], i, settings, with_vision=sees(engine.config), **decode)
    modality: Modality = (
        "video" if now.frames else "image" if now.images else "audio" if now.audios else "text"
    )
    system = "\n".join([engine.prompts.system_prompt(modality), *(s for s in system_texts if s.strip())])
    render = functools.partial(
        user_input,
        engine.prompts,
        text="\n".join(t for t in now.texts if t),
        images=now.images,
        audios=now.audios,
        video_frames=now.frames,
        history=history,
        system=system,
    )
    try:
        # Tokenizing a long prompt takes a while: keep the event loop serving others meanwhile.
        prompt = await run(render) if _text_chars(req) > limits.OFFLOAD_TEXT_CHARS else render()
    except ValueError as exc:
        raise RequestError(
            400, f"messages[{blocks[-1][1][-1]}]: {exc}", "invalid_value", "messages"
        ) from None
    # Audio items follow placeholder order: earlier turns' clips come first.
    return dataclasses.replace(prompt, audios=[*history_audios, *prompt.audios])


async def _transcript(transcriber: Transcriber, clip: np.ndarray) -> str:
    """What was said in an audio part, for a model that hears through transcripts."""
    try:
        return (await transcriber.transcribe(clip)).text
    except TranscriptionError as exc:
        raise RequestError(503, f"this model hears audio through input transcription, which failed: {exc}",
                           "transcription_failed") from None


def vision_notice(req: ChatRequest, engine: VitaEngine) -> str | None:
    """The note for a response whose model cannot see (untrained vision tower) while the last user turn had
    images or video: they were left out, and the text was answered (never an empty answer to noise)."""
    if sees(engine.config):
        return None
    kinds: list[str] = []
    for message in reversed(req.messages):
        if message.role != "user":
            break
        if isinstance(message.content, list):
            kinds += [p.type for p in message.content if isinstance(p, ImagePart | VideoPart)]
    if not kinds:
        return None
    images, videos = kinds.count("image_url"), kinds.count("video_url")
    left_out = " and ".join(f"{n} {what}{'s' if n > 1 else ''}" for n, what in ((images, "image"), (videos, "video"))
                            if n)
    return (f"This model cannot see (its vision tower is not trained): {left_out} left out; "
            "the answer is to the rest of the message.")


# --- generation ------------------------------------------------------------------------------------------

class _Generation:
    """One engine request: its first output is awaited before any response is sent (so a prompt the engine
    rejects is a 400), the state token is split off, and `close` always aborts an unfinished request and
    releases the admission slot exactly once."""

    def __init__(
        self, state: AppState, engine: VitaEngine, prompt: EngineInput, sampling: Sampling, request_id: str
    ) -> None:
        self._app = state
        self.engine = engine
        self.prompt = prompt
        self.sampling = sampling
        self.request_id = request_id
        self.state = "unknown"
        self.notice: str | None = None  # said in the response's `vita` (e.g. images the model cannot see)
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self._stream: AsyncIterator[Delta] | None = None
        self._first: Delta | None = None
        self._text = VisibleText()
        self._closed = False

    @property
    def prompt_tokens(self) -> int:
        # The engine reports the prompt after media expansion on its first delta.
        if self._first is not None and self._first.num_prompt_tokens is not None:
            return self._first.num_prompt_tokens
        return len(self.prompt.token_ids)

    async def start(self, started: float) -> None:
        self._stream = self.engine.generate(self.prompt, self.request_id, self.sampling)
        try:
            self._first = await anext(self._stream, None)
        except PromptTooLongError as exc:
            raise RequestError(400, f"messages: {exc}", exc.code, "messages") from None
        except Exception as exc:
            if not _is_client_error(exc):
                raise
            raise RequestError(
                400, f"the engine refused the prompt: {exc}", "invalid_prompt", "messages"
            ) from None
        self._app.metrics.ttft.observe(time.monotonic() - started)
        if self._first is not None:
            self._state_off_first()

    async def text(self) -> AsyncIterator[str]:
        """Visible text pieces until the request ends; then `finish_reason` is "stop" or "length"."""
        assert self._stream is not None, "start() first"
        delta, self._first = self._first, None
        while delta is not None:
            piece = self._text.push(delta.text)
            self.completion_tokens += len(delta.token_ids)
            if piece:
                yield piece
            if delta.finish_reason is not None:
                break
            delta = await anext(self._stream, None)
        rest = self._text.flush()
        if rest:
            yield rest
        self.finish_reason = "length" if delta is not None and delta.finish_reason == "length" else "stop"
        if not self._text.started:
            log.warning("chat request %s: the answer has no visible text (%d tokens, finish %s)", self.request_id,
                        self.completion_tokens, self.finish_reason)

    def _state_off_first(self) -> None:
        """Classify by the first token's id and drop that token, so the first chunk can carry the state."""
        first = self._first
        assert first is not None
        if not first.token_ids:
            return
        self.state = classify_first_token(first.token_ids[0], self.engine.state_tokens)
        if self.state != "unknown":
            token = STATE_TOKEN_TEXT[self.engine.config.layout][self.state]
            # VisibleText would hide its text too; dropping the token here keeps the token count right.
            self._first = dataclasses.replace(
                first, token_ids=first.token_ids[1:], text=first.text.removeprefix(token)
            )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._app.ended_requests.add(self)
        # Shielded: this runs while a disconnected stream is being cancelled, and the abort must still happen.
        with anyio.CancelScope(shield=True):
            try:
                if self.finish_reason is None and self._stream is not None:
                    await self.engine.abort(self.request_id)
                    self._app.metrics.chat_aborted.inc()
                if self._stream is not None:
                    with contextlib.suppress(Exception):
                        await self._stream.aclose()  # type: ignore[attr-defined]
            except Exception:
                log.exception("aborting chat request %s failed", self.request_id)
            finally:
                self._app.release()


def _is_client_error(exc: Exception) -> bool:
    """vLLM's request checks (prompt longer than the context, too many images, ...) are the client's fault."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # older vLLM: its checks raise ValueError
        return isinstance(exc, ValueError)
    return isinstance(exc, (ValueError, VLLMClientError))


def _pick_engine(engines: list[VitaEngine]) -> VitaEngine:
    """The least busy of the engines that serve (while one restarts, the others take its requests)."""
    return min(engines, key=lambda e: e.num_unfinished())


def _engine_lost(exc: BaseException) -> bool:
    """The request's engine died (possibly reported through a task group's ExceptionGroup)."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_engine_lost(e) for e in exc.exceptions)
    return isinstance(exc, EngineUnavailableError)


def _sampling(req: ChatRequest, settings: ServerSettings, engine: VitaEngine) -> Sampling:
    # The server's max_tokens is the ceiling, as for realtime: one request must not hold an engine as
    # long as it likes (max_tokens=1e9 would stream until the context is full).
    wanted = min(req.max_completion_tokens or req.max_tokens or settings.max_tokens, settings.max_tokens)
    return Sampling(
        max_tokens=reply_token_budget(wanted, engine.state_tokens),  # the state token comes on top
        temperature=settings.temperature if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
    )


# --- speech ----------------------------------------------------------------------------------------------


class _Speech:
    """Speaks the reply with the server's TTS at 24 kHz; failures become a warning, never a failed reply."""

    def __init__(self, tts: TextToSpeech) -> None:
        self.tts = tts
        self.id = "audio_" + uuid.uuid4().hex
        self.expires_at = int(time.time()) + AUDIO_EXPIRES_S
        self.chunker = SentenceChunker()
        self.warning: str | None = None

    async def pcm(self, text: str) -> np.ndarray:
        if self.warning or not text.strip():
            return np.zeros(0, np.float32)
        chunks: list[np.ndarray] = []
        try:
            async with contextlib.aclosing(self.tts.synthesize(text)) as stream:  # type: ignore[type-var]
                async for chunk in stream:
                    chunks.append(np.asarray(chunk, dtype=np.float32))
        except Exception as exc:  # noqa: BLE001 - a voice failure must not fail the text reply
            log.warning("TTS failed: %s", exc)
            self.warning = f"speech synthesis failed ({type(exc).__name__}); the reply has text only"
            return np.zeros(0, np.float32)
        pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        return resample(pcm, self.tts.sample_rate, OUTPUT_SAMPLE_RATE)


def _speech(state: AppState, req: ChatRequest) -> tuple[_Speech | None, str | None]:
    if not req.wants_audio:
        return None, None
    tts = state.tts_factory()
    if isinstance(tts, TextOnlyTTS):
        return None, "this server has no speech synthesis (text-only TTS); the reply has no audio"
    return _Speech(tts), None


def wav_bytes(pcm16: bytes, sample_rate: int = OUTPUT_SAMPLE_RATE) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm16)
    return out.getvalue()


# --- responses -------------------------------------------------------------------------------------------


def _usage(gen: _Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.completion_tokens,
        "total_tokens": gen.prompt_tokens + gen.completion_tokens,
    }


def _vita(gen: _Generation, warning: str | None) -> dict[str, str]:
    return {"state": gen.state, **({"warning": warning} if warning else {}),
            **({"notice": gen.notice} if gen.notice else {})}


async def _text_unless_disconnected(request: Request, gen: _Generation) -> str | None:
    """The whole reply, or None as soon as the client hangs up. (`request.is_disconnected()` cannot see a
    disconnect through the app's HTTP middleware, so a task waits for the disconnect message itself.)"""
    pieces: list[str] = []
    done = False
    async with anyio.create_task_group() as group:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            group.cancel_scope.cancel()

        group.start_soon(watch)
        async for piece in gen.text():
            pieces.append(piece)
        done = True
        group.cancel_scope.cancel()
    return "".join(pieces) if done else None


async def _complete(
    request: Request,
    gen: _Generation,
    req: ChatRequest,
    head: dict[str, Any],
    speech: _Speech | None,
    warning: str | None,
) -> dict[str, Any] | None:
    text = await _text_unless_disconnected(request, gen)
    if text is None:
        return None  # nobody to answer; close() aborts the engine request
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if speech is not None:
        pcm16 = float_to_pcm16(await speech.pcm(text))
        audio = pcm16 if req.audio is not None and req.audio.format == "pcm16" else wav_bytes(pcm16)
        if speech.warning is None:
            message["audio"] = {
                "id": speech.id,
                "data": base64.b64encode(audio).decode(),
                "transcript": text,
                "expires_at": speech.expires_at,
            }
        warning = speech.warning
    return {
        **head,
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message, "finish_reason": gen.finish_reason, "logprobs": None}],
        "usage": _usage(gen),
        "vita": _vita(gen, warning),
    }


def _event(payload: dict[str, Any]) -> str:
    """One SSE event's data (sse-starlette frames it as `data: …` lines)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


async def _stream(
    gen: _Generation, req: ChatRequest, head: dict[str, Any], speech: _Speech | None, warning: str | None
) -> AsyncIterator[str]:
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
        body = {
            **head,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            **extra,
        }
        if include_usage:
            body.setdefault("usage", None)
        return _event(body)

    async def spoken(sentences: list[str]) -> AsyncIterator[str]:
        assert speech is not None
        for sentence in sentences:
            pcm = await speech.pcm(sentence)
            if len(pcm):
                data = base64.b64encode(float_to_pcm16(pcm)).decode()
                yield chunk({"audio": {"id": speech.id, "data": data}})

    try:
        yield chunk({"role": "assistant", "content": ""}, vita=_vita(gen, None))
        async for piece in gen.text():
            delta: dict[str, Any] = {"content": piece}
            if speech is not None:
                delta["audio"] = {"id": speech.id, "transcript": piece}
            yield chunk(delta)
            if speech is not None:
                async for event in spoken(speech.chunker.push(piece)):
                    yield event
        if speech is not None:
            async for event in spoken(speech.chunker.flush()):
                yield event
            yield chunk({"audio": {"id": speech.id, "expires_at": speech.expires_at}})
            warning = speech.warning or warning
        yield chunk({}, gen.finish_reason, vita=_vita(gen, warning))
        if include_usage:
            yield _event({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(gen)})
    except Exception as exc:  # headers are sent: report in-band, as OpenAI and vLLM do
        lost = _engine_lost(exc)
        if lost:
            log.warning("chat stream %s lost with its engine: %s", gen.request_id, exc)
        else:
            log.exception("chat stream %s failed", gen.request_id)
        error = {
            "message": "the engine serving this request stopped; retry" if lost
            else f"generation failed: {type(exc).__name__}",
            "type": "server_error",
            "code": "engine_unavailable" if lost else "engine_error",
        }
        yield _event({"error": {**error, "param": None}})
    finally:
        await gen.close()
    yield "[DONE]"


async def _nothing_to_close() -> None:
    return None


class _EventStream(EventSourceResponse):
    """SSE (sse-starlette: the framing, keep-alive pings, client-disconnect detection) whose `on_close` runs
    however the response ends: completed, client gone, or never started."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        # "\n" line ends as OpenAI's own stream; pings keep idle proxies from cutting a long first token.
        super().__init__(content, sep="\n", ping=SSE_PING_S)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(self.body_iterator, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await aclose()
                await self._on_close()
            # sse-starlette's task group leaves a reference cycle behind (a cancelled task's traceback holds the
            # frame whose callback holds this response) that only the interpreter's rare full collection frees:
            # the generation, with its prompt's audio and images, must not be in it (the closed stream is empty).
            self._on_close = _nothing_to_close


# --- the endpoint ----------------------------------------------------------------------------------------


def _fail(state: AppState, error: RequestError) -> JSONResponse:
    state.metrics.errors.labels(code=error.code or str(error.status)).inc()
    return error.response()


def document_request_body(openapi: dict[str, Any]) -> None:
    """Declare ChatRequest as the chat body in the OpenAPI schema. The route reads the body by hand (so
    bad JSON gets an OpenAI-style error, not FastAPI's), and FastAPI documents only what it parses."""
    schema = ChatRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = schema.pop("$defs", {})
    openapi.setdefault("components", {}).setdefault("schemas", {}).update({**defs, "ChatRequest": schema})
    openapi["paths"]["/v1/chat/completions"]["post"]["requestBody"] = {
        "required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}}},
    }


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state: AppState = request.app.state.vita
    started = time.monotonic()
    state.metrics.requests.labels(endpoint="chat_completions").inc()
    try:
        req = await _read_request(request, state.offload)
    except RequestError as exc:
        return _fail(state, exc)
    except ClientDisconnect:  # gone before its body was in: nobody to answer, nothing to trace
        log.debug("chat client disconnected while sending its request body")
        return Response(status_code=499)
    if not state.pool.ready or not state.pool.serving_engines():
        detail = f" (startup failed: {state.startup_error})" if state.startup_error else "; retry shortly"
        return _fail(
            state,
            RequestError(
                503, f"the engines are not ready{detail}", "engines_not_ready", headers={"Retry-After": "5"}
            ),
        )
    if not state.try_admit():
        return _fail(
            state,
            RequestError(
                503,
                "the server is at capacity; retry shortly",
                "server_at_capacity",
                headers={"Retry-After": "1"},
            ),
        )
    gen: _Generation | None = None
    handed_off = False
    try:
        engine = _pick_engine(state.pool.serving_engines())
        prompt = await build_prompt(req, engine, state.settings, state.offload, state.transcriber)
        request_id = "chatcmpl-" + uuid.uuid4().hex
        gen = _Generation(state, engine, prompt, _sampling(req, state.settings, engine), request_id)
        gen.notice = vision_notice(req, engine)
        if gen.notice:
            log.info("chat request %s: %s", request_id, gen.notice)
        await gen.start(started)
        head = {
            "id": request_id,
            "created": int(time.time()),
            "model": state.pool.model_id,
            "system_fingerprint": None,
        }
        speech, warning = _speech(state, req)
        if speech is not None and req.stream and req.audio is not None and req.audio.format == "wav":
            warning = (
                "streamed audio is raw PCM16 mono at 24 kHz; audio.format wav applies to non-streamed replies"
            )
        if req.stream:
            response = _EventStream(_stream(gen, req, head, speech, warning), on_close=gen.close)
            handed_off = True
            return response
        body = await _complete(request, gen, req, head, speech, warning)
        return JSONResponse(body) if body is not None else Response(status_code=499)
    except RequestError as exc:
        return _fail(state, exc)
    except Exception as exc:
        if _engine_lost(exc):  # not the client's fault, and a retry is served by another engine or after restart
            log.warning("chat request lost with its engine: %s", exc)
            retry = state.pool.retry_after_s()
            return _fail(state, RequestError(
                503, f"the engine serving this request stopped; retry (in {retry} s)", "engine_unavailable",
                headers={"Retry-After": str(retry)},
            ))
        log.exception("chat completion failed")
        return _fail(
            state, RequestError(500, "internal error while generating; see the server log", "internal_error")
        )
    finally:
        if not handed_off:
            if gen is not None:
                await gen.close()  # aborts if unfinished, releases the slot
            else:
                state.release()
