"""OpenAI Realtime client events as pydantic models (GA names; beta names accepted as aliases). VITA's
own events live under the `vita.` prefix.

Lenient where OpenAI's clients differ (unknown fields are ignored: the Agents SDK sends `tracing`,
`tools`...), strict where a value would be misread. `parse_client_event(text)`
returns a model or raises `ProtocolError`, so the socket can answer with an `error` event and stay open.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from .errors import ErrorCode, ProtocolError


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore")
    event_id: str | None = None


class TurnDetection(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: Annotated[float, Field(gt=0, lt=1)] | None = None
    prefix_padding_ms: Annotated[int, Field(ge=0, le=5000)] | None = None
    silence_duration_ms: Annotated[int, Field(ge=0, le=10000)] | None = None
    create_response: bool | None = None
    interrupt_response: bool | None = None
    idle_timeout_ms: int | None = None
    eagerness: Literal["low", "medium", "high", "auto"] | None = None  # semantic_vad


class Transcription(BaseModel):
    """`audio.input.transcription`: input transcription on (null: off). The server's backend transcribes;
    `model` is accepted and `session.updated` reports the one in effect."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    language: Annotated[str, Field(max_length=35)] | None = None  # ISO-639-1 ("en"); BCP-47 tags accepted
    prompt: Annotated[str, Field(max_length=4096)] | None = None


class _AudioIO(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: dict[str, Any] | str | None = None
    turn_detection: TurnDetection | None = Field(default=None)
    voice: str | None = None
    transcription: Transcription | None = None  # input only


class _Audio(BaseModel):
    model_config = ConfigDict(extra="ignore")
    input: _AudioIO | None = None
    output: _AudioIO | None = None


class SessionConfig(BaseModel):
    """GA fields plus the beta flat ones (modalities, input/output_audio_format, turn_detection, voice)."""

    model_config = ConfigDict(extra="ignore")
    type: str | None = None
    instructions: str | None = None
    output_modalities: list[Literal["text", "audio"]] | None = None
    modalities: list[Literal["text", "audio"]] | None = None  # beta
    audio: _Audio | None = None
    input_audio_format: str | dict[str, Any] | None = None  # beta
    output_audio_format: str | dict[str, Any] | None = None  # beta
    turn_detection: TurnDetection | None = None  # beta
    voice: str | None = None  # beta
    input_audio_transcription: Transcription | None = None  # beta
    max_output_tokens: Annotated[int, Field(ge=1)] | Literal["inf"] | None = None
    max_response_output_tokens: Annotated[int, Field(ge=1)] | Literal["inf"] | None = None  # beta

    def turn_detection_given(self) -> tuple[bool, TurnDetection | None]:
        """Whether the update mentions turn detection at all (null means: manual turns)."""
        if "turn_detection" in self.model_fields_set:
            return True, self.turn_detection
        if self.audio and self.audio.input and "turn_detection" in self.audio.input.model_fields_set:
            return True, self.audio.input.turn_detection
        return False, None

    def transcription_given(self) -> tuple[bool, Transcription | None]:
        """Whether the update mentions input transcription at all (null means: off)."""
        if self.audio and self.audio.input and "transcription" in self.audio.input.model_fields_set:
            return True, self.audio.input.transcription
        if "input_audio_transcription" in self.model_fields_set:
            return True, self.input_audio_transcription
        return False, None

    def modalities_given(self) -> list[str] | None:
        return self.output_modalities or self.modalities


class SessionUpdate(_Event):
    type: Literal["session.update"]
    session: SessionConfig


class AudioAppend(_Event):
    type: Literal["input_audio_buffer.append"]
    audio: str


class AudioCommit(_Event):
    type: Literal["input_audio_buffer.commit"]


class AudioClear(_Event):
    type: Literal["input_audio_buffer.clear"]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["input_text", "input_audio", "input_image", "text", "output_text"]
    text: str | None = None
    audio: str | None = None
    image_url: str | None = None


class Item(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system"] = "user"
    content: list[ContentPart] = Field(min_length=1)


class ItemCreate(_Event):
    type: Literal["conversation.item.create"]
    item: Item
    previous_item_id: str | None = None


class ItemTruncate(_Event):
    type: Literal["conversation.item.truncate"]
    item_id: str
    content_index: int = 0
    audio_end_ms: Annotated[int, Field(ge=0)]


class ItemDelete(_Event):
    type: Literal["conversation.item.delete"]
    item_id: str


class ItemRetrieve(_Event):
    type: Literal["conversation.item.retrieve"]
    item_id: str


class OutputAudioBufferClear(_Event):
    """GA: WebRTC/SIP only (there the server holds the playback buffer); answered with an error here."""

    type: Literal["output_audio_buffer.clear"]


class ResponseConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    output_modalities: list[Literal["text", "audio"]] | None = None
    modalities: list[Literal["text", "audio"]] | None = None  # beta
    instructions: str | None = None
    conversation: str | None = None


class ResponseCreate(_Event):
    type: Literal["response.create"]
    response: ResponseConfig = Field(default_factory=ResponseConfig)


class ResponseCancel(_Event):
    type: Literal["response.cancel"]
    response_id: str | None = None


class FrameAppend(_Event):
    """VITA extension: one live camera frame (base64 JPEG/PNG or a data: URL)."""

    type: Literal["vita.frame.append"]
    image: str


def _not_blank(text: str) -> str:
    # Python's notion of blank (str.strip), not the regex engine's: "\x1f" is whitespace to str.strip but
    # not to pydantic's `\S`, and the session refuses what str.strip empties.
    if not text.strip():
        raise ValueError("text must not be blank")
    return text


class TextAppend(_Event):
    """VITA extension: typed text gated like speech (VITA answers ☜ / <3>)."""

    type: Literal["vita.text.append"]
    text: Annotated[str, AfterValidator(_not_blank)]


ClientEvent = (
    SessionUpdate | AudioAppend | AudioCommit | AudioClear | ItemCreate | ItemTruncate | ItemDelete | ItemRetrieve
    | OutputAudioBufferClear | ResponseCreate | ResponseCancel | FrameAppend | TextAppend
)

_MODELS: dict[str, type[BaseModel]] = {
    "session.update": SessionUpdate,
    "input_audio_buffer.append": AudioAppend,
    "input_audio_buffer.commit": AudioCommit,
    "input_audio_buffer.clear": AudioClear,
    "conversation.item.create": ItemCreate,
    "conversation.item.truncate": ItemTruncate,
    "conversation.item.delete": ItemDelete,
    "conversation.item.retrieve": ItemRetrieve,
    "output_audio_buffer.clear": OutputAudioBufferClear,
    "response.create": ResponseCreate,
    "response.cancel": ResponseCancel,
    "vita.frame.append": FrameAppend,
    "vita.text.append": TextAppend,
}
# Beta spellings of client events that were renamed in GA.
ALIASES: dict[str, str] = {"transcription_session.update": "session.update"}
# Every client event type the server knows, beta aliases included (the fuzzer draws from these).
EVENT_TYPES: frozenset[str] = frozenset(_MODELS)


def parse_client_event(text: str | bytes) -> ClientEvent:
    try:
        data = json.loads(text)
        # Lone surrogates are valid JSON escapes but not text: refuse them before they reach anything.
        json.dumps(data, ensure_ascii=False).encode()
    except (ValueError, RecursionError, UnicodeError) as exc:  # bad JSON, 5000-digit ints, deep nesting
        raise ProtocolError(ErrorCode.INVALID_JSON, f"event is not valid JSON text: {str(exc)[:200]}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_EVENT, "an event must be a JSON object with a 'type' field")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.MISSING_TYPE, "the event has no string 'type' field", "type", event_id)
    kind = ALIASES.get(kind, kind)
    model = _MODELS.get(kind)
    if model is None:
        known = ", ".join(sorted(_MODELS))
        raise ProtocolError(ErrorCode.UNKNOWN_EVENT_TYPE, f"unknown event type {kind!r}; accepted: {known}", "type",
                            event_id)
    try:
        return model.model_validate({**data, "type": kind})  # type: ignore[return-value]
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        raise ProtocolError(ErrorCode.INVALID_VALUE, f"{kind}: {param}: {first['msg']}", param, event_id) from None


_APPEND = "input_audio_buffer.append"
_APPEND_BYTES = _APPEND.encode()
_APPEND_KEYS = (frozenset({"type", "audio"}), frozenset({"type", "audio", "event_id"}))


def parse_audio_append(text: str | bytes) -> AudioAppend | None:
    """The hot event, `input_audio_buffer.append` (fifty a second per session), without the general parser:
    the event when `text` is exactly `{"type": "input_audio_buffer.append", "audio": <str>}` with an optional
    `"event_id": <str or null>`, every string ASCII; else None, and the caller hands the text to
    `parse_client_event`, which accepts or refuses it exactly as it always did (an append with other fields,
    non-ASCII strings or any mistake takes that path: its answer is the reference).

    What it accepts, the general parser accepts with the same result: orjson parses a subset of what `json`
    does and refuses lone surrogates; ASCII strings need no surrogate re-check (which re-serialized the whole
    event: half of the general parser's cost); the two fields are type-checked here, so the model's
    validation cannot fail. ~2.5 us instead of ~12 us per 20 ms event (bench/RESULTS.md, issue 14). The
    audio's base64 is checked where it is decoded, as before. The model is built by its validator itself
    (what `model_validate` calls, less its Python wrapper: ~0.5 us); `model_construct` is no faster (~3 us)."""
    data = _plain_append(text)
    return None if data is None else AudioAppend.__pydantic_validator__.validate_python(data)  # type: ignore[no-any-return]


def audio_append_fields(text: str | bytes) -> tuple[str, str | None] | None:
    """`parse_audio_append`'s (audio, event_id) without building the model (whose fields these are, checked
    the same way): for a caller that reads nothing else of the event (~1 us of an append's ~3; issue 14)."""
    data = _plain_append(text)
    return None if data is None else (data["audio"], data.get("event_id"))


def _plain_append(text: str | bytes) -> dict[str, Any] | None:
    """The JSON object of an append `parse_audio_append` takes, its fields checked; else None."""
    if (_APPEND if isinstance(text, str) else _APPEND_BYTES) not in text:  # any other event: one fast scan
        return None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict or data.keys() not in _APPEND_KEYS or data["type"] != _APPEND:
        return None
    audio, event_id = data["audio"], data.get("event_id")
    if type(audio) is not str or not audio.isascii():
        return None
    if event_id is not None and (type(event_id) is not str or not event_id.isascii()):
        return None
    return data
