"""Server events as typed models: OpenAI's own GA models (`openai.types.realtime`) for the protocol's
events, ours (vita_events.py) for the `vita.*` extensions.

`ServerEventEncoder` is the one way an event reaches a socket: `new()` builds it, validated strictly and
stamped with a unique `event_id` (GA requires one on every server event), and `encode()` serializes it.
A field of the wrong type or a name the model does not declare raises in the server, so it can never
reach a client; tests/test_wire_conformance.py checks what a real session sends against the SDK.
"""

from __future__ import annotations

import itertools
import json
import secrets
from typing import Any, Literal, TypeVar

from openai.types.realtime import (
    ConversationItemAdded,
    ConversationItemDone,
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemInputAudioTranscriptionDeltaEvent,
    ConversationItemInputAudioTranscriptionFailedEvent,
    ConversationItemTruncatedEvent,
    InputAudioBufferClearedEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
    RealtimeError,
    RealtimeErrorEvent,
    ResponseAudioDeltaEvent,
    ResponseAudioDoneEvent,
    ResponseAudioTranscriptDeltaEvent,
    ResponseAudioTranscriptDoneEvent,
    ResponseContentPartAddedEvent,
    ResponseContentPartDoneEvent,
    ResponseCreatedEvent,
    ResponseDoneEvent,
    ResponseOutputItemAddedEvent,
    ResponseOutputItemDoneEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
    SessionCreatedEvent,
    SessionUpdatedEvent,
)
from openai.types.realtime.realtime_audio_formats import AudioPCM
from openai.types.realtime.realtime_server_event import ConversationItemRetrieved, OutputAudioBufferCleared
from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from .vita_events import VitaServerEvent

# Every GA server event this server sends (README: "Realtime protocol reference" lists them, and which
# GA events it does not send and why).
GAServerEvent = (
    SessionCreatedEvent | SessionUpdatedEvent | RealtimeErrorEvent
    | InputAudioBufferSpeechStartedEvent | InputAudioBufferSpeechStoppedEvent | InputAudioBufferCommittedEvent
    | InputAudioBufferClearedEvent
    | ConversationItemAdded | ConversationItemDone | ConversationItemTruncatedEvent | ConversationItemRetrieved
    | ConversationItemInputAudioTranscriptionDeltaEvent | ConversationItemInputAudioTranscriptionCompletedEvent
    | ConversationItemInputAudioTranscriptionFailedEvent
    | ResponseCreatedEvent | ResponseOutputItemAddedEvent | ResponseContentPartAddedEvent
    | ResponseTextDeltaEvent | ResponseTextDoneEvent | ResponseAudioDeltaEvent | ResponseAudioDoneEvent
    | ResponseAudioTranscriptDeltaEvent | ResponseAudioTranscriptDoneEvent
    | ResponseContentPartDoneEvent | ResponseOutputItemDoneEvent | ResponseDoneEvent
    | OutputAudioBufferCleared
)
ServerEvent = GAServerEvent | VitaServerEvent

M = TypeVar("M", bound=BaseModel)


class AudioPCMAnyRate(AudioPCM):
    """`audio/pcm` at 16000 Hz as well: VITA's one extension of a GA value (GA's schema has 24000 only).
    Used only when a client asked for 16 kHz; a GA session reports plain `AudioPCM`."""

    rate: Literal[16000, 24000] | None = None  # type: ignore[assignment]


def strict(model: type[M], /, **fields: Any) -> M:
    """`model` validated strictly from `fields`: a wrong type raises, and so does a field the model does
    not declare, at any depth (OpenAI's models allow extra fields, so a typo would otherwise go out).
    Nested objects given as models are taken as they are: build those with `strict` too."""
    return model.model_validate(fields, strict=True, extra="forbid")


class ServerEventEncoder:
    """Builds and serializes the server events of one connection; their ids never repeat."""

    def __init__(self) -> None:
        self._prefix = f"event_{secrets.token_hex(6)}_"  # random per connection, then a serial number
        self._serial = itertools.count(1)

    def new(self, model: type[M], /, **fields: Any) -> M:
        """A server event of type `model` with a fresh `event_id`. Pass nested objects as dicts (they are
        validated with the event) or as models built with `strict`."""
        return strict(model, event_id=f"{self._prefix}{next(self._serial):x}", **fields)

    def error(self, error: RealtimeError) -> RealtimeErrorEvent:
        return self.new(RealtimeErrorEvent, type="error", error=error)

    @staticmethod
    def encode(event: ServerEvent) -> str:
        """JSON text of exactly the fields that were set (a `None` given is sent as null).

        serialize_as_any: each object by its own class (AudioPCMAnyRate is not one of GA's union members)."""
        try:
            return event.model_dump_json(exclude_unset=True, serialize_as_any=True)
        except PydanticSerializationError:
            # Not Unicode (a lone surrogate: the parser refuses them, so only a bug gets here). json.dumps
            # escapes it instead of losing the event.
            return json.dumps(event.model_dump(exclude_unset=True, serialize_as_any=True))
