"""The conversation as a realtime client sees it: item and response ids, the recent items (for
`conversation.item.retrieve`), and the typed server events that report the duplex session's actions.

Sans-I/O like the controller: methods return events, the connection sends them.
"""

from __future__ import annotations

import base64
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from openai.types.realtime import (
    ConversationItem,
    ConversationItemAdded,
    ConversationItemDone,
    ConversationItemInputAudioTranscriptionCompletedEvent,
    ConversationItemInputAudioTranscriptionDeltaEvent,
    ConversationItemInputAudioTranscriptionFailedEvent,
    ConversationItemTruncatedEvent,
    InputAudioBufferCommittedEvent,
    InputAudioBufferSpeechStartedEvent,
    InputAudioBufferSpeechStoppedEvent,
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
)
from openai.types.realtime.realtime_server_event import ConversationItemRetrieved, OutputAudioBufferCleared

from duplex.events import (
    ClearOutput,
    EmitAudio,
    EmitText,
    Error,
    InputDropped,
    PauseOutput,
    ResponseDone,
    ResponseStarted,
    ResponseTruncated,
    ResumeOutput,
    RolesSwapped,
    SegmentClassified,
    SpeechStartedNotice,
    SpeechStopped,
    SpeechStoppedNotice,
)
from duplex.transcription import Transcript, TranscriptDelta, TranscriptionEvent

from .limits import MAX_TRACKED_IDS
from .metrics import Metrics
from .realtime_config import RealtimeConfig
from .resampling import StreamResampler
from .wire import items
from .wire import vita_events as vita
from .wire.audio_codec import encode
from .wire.errors import ErrorCode, realtime_error
from .wire.server_events import ServerEvent, ServerEventEncoder

log = logging.getLogger(__name__)

OUTPUT_RATE = 24000  # the session runtime's output rate; converted to the wire format here
# 16 kHz samples per millisecond: the session's sample positions → the wire's milliseconds.
SAMPLES_PER_MS = 16


V = TypeVar("V")


def new_item_id() -> str:
    return "item_" + uuid.uuid4().hex[:20]


@dataclass
class _Response:
    response_id: str
    item_id: str
    audio: bool  # output modality: audio (+ transcript) or text
    text: str = ""
    first_delta_at: float | None = None
    request_id: str | None = None


class _Recent(OrderedDict[str, V]):
    """A dict of its newest `limit` entries: adding one past that forgets the oldest."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: str, value: V) -> None:
        super().__setitem__(key, value)
        while len(self) > self.limit:
            self.popitem(last=False)


class ItemLog:
    """The conversation's recent items by id, newest last: at most `max_items`, and past the first at
    most `max_chars` of text in all (a typed item may be 15 MiB; VITA's history keeps two turns anyway)."""

    def __init__(self, max_items: int = 64, max_chars: int = 1 << 20) -> None:
        self.max_items, self.max_chars = max_items, max_chars
        self._items: OrderedDict[str, tuple[ConversationItem, int]] = OrderedDict()
        self._chars = 0

    def put(self, item: ConversationItem) -> None:
        assert item.id is not None
        size = sum(len(part.text or "") + len(getattr(part, "transcript", None) or "") for part in item.content)
        if item.id in self._items:
            self._chars -= self._items.pop(item.id)[1]
        self._items[item.id] = (item, size)
        self._chars += size
        while len(self._items) > 1 and (len(self._items) > self.max_items or self._chars > self.max_chars):
            self._chars -= self._items.popitem(last=False)[1][1]

    @property
    def chars(self) -> int:
        """Characters of text the log holds."""
        return self._chars

    def get(self, item_id: str) -> ConversationItem | None:
        entry = self._items.get(item_id)
        return entry[0] if entry else None


class Conversation:
    def __init__(self, events: ServerEventEncoder, config: RealtimeConfig, metrics: Metrics,
                 conversation_id: str) -> None:
        self.events, self.config, self.metrics = events, config, metrics
        self.conversation_id = conversation_id
        self.items = ItemLog()
        self.next_modalities: list[str] | None = None  # response.create's output_modalities, for the next one
        # Recent ids only (MAX_TRACKED_IDS each): a session of thousands of turns forgets the oldest.
        self._responses: _Recent[_Response] = _Recent(MAX_TRACKED_IDS)
        self._item_to_response: _Recent[str] = _Recent(MAX_TRACKED_IDS)
        self._segment_items: _Recent[str] = _Recent(MAX_TRACKED_IDS)
        self._last_item_id: str | None = None
        self._speech_started_at: float | None = None
        self._speech_stopped_at: float | None = None

    # --- items the client added --------------------------------------------------------------------

    def user_item(self, item_id: str, parts: list[items.UserPart]) -> list[ServerEvent]:
        return self._added_and_done(items.user_message(item_id, parts))

    def system_item(self, item_id: str, texts: list[str]) -> list[ServerEvent]:
        return self._added_and_done(items.system_message(item_id, texts))

    def audio_committed(self, item_id: str) -> list[ServerEvent]:
        """A spoken turn joins the conversation (VAD segment, or the manual buffer committed)."""
        committed = self.events.new(InputAudioBufferCommittedEvent, type="input_audio_buffer.committed",
                                    item_id=item_id, previous_item_id=self._last_item_id)
        return [committed, *self.user_item(item_id, [{"type": "input_audio", "transcript": None}])]

    def _added_and_done(self, item: ConversationItem) -> list[ServerEvent]:
        assert item.id is not None
        self.items.put(item)
        previous, self._last_item_id = self._last_item_id, item.id
        return [
            self.events.new(ConversationItemAdded, type="conversation.item.added", previous_item_id=previous,
                            item=item),
            self.events.new(ConversationItemDone, type="conversation.item.done", previous_item_id=previous,
                            item=item),
        ]

    def retrieved(self, item_id: str) -> ConversationItemRetrieved | None:
        item = self.items.get(item_id)
        if item is None:
            return None
        return self.events.new(ConversationItemRetrieved, type="conversation.item.retrieved", item=item)

    def response_of(self, item_id: str) -> str | None:
        """The response that produced this assistant item (truncate names items, the session responses)."""
        return self._item_to_response.get(item_id)

    # --- the session's actions ---------------------------------------------------------------------

    def events_for(self, action: Any) -> list[ServerEvent]:
        if isinstance(action, SpeechStartedNotice):
            self._speech_started_at = time.monotonic()
            return [self.events.new(InputAudioBufferSpeechStartedEvent, type="input_audio_buffer.speech_started",
                                    audio_start_ms=action.sample // SAMPLES_PER_MS,
                                    item_id=self._segment_item(action.segment_id))]
        if isinstance(action, SpeechStoppedNotice):
            self._speech_stopped_at = time.monotonic()
            item_id = self._segment_item(action.segment_id)
            out: list[ServerEvent] = [
                self.events.new(InputAudioBufferSpeechStoppedEvent, type="input_audio_buffer.speech_stopped",
                                audio_end_ms=action.sample // SAMPLES_PER_MS, item_id=item_id)
            ]
            if not action.committed:
                out.append(self.events.new(vita.SegmentDiscarded, type="vita.segment.discarded", item_id=item_id))
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
            if self._speech_started_at is not None:
                self.metrics.barge_in.observe(time.monotonic() - self._speech_started_at)
            return [self.events.new(vita.OutputPaused, type="vita.output.paused", response_id=action.response_id)]
        if isinstance(action, ResumeOutput):
            return [self.events.new(vita.OutputResumed, type="vita.output.resumed", response_id=action.response_id)]
        if isinstance(action, ClearOutput):
            return [self.events.new(OutputAudioBufferCleared, type="output_audio_buffer.cleared",
                                    response_id=action.response_id)]
        if isinstance(action, ResponseDone):
            return self._response_done(action)
        if isinstance(action, ResponseTruncated):
            return self._truncated(action)
        if isinstance(action, InputDropped):
            return [self._dropped(action)]
        if isinstance(action, SpeechStopped):  # for /metrics only: no client event
            self.metrics.speech_stop.observe(action.after_s)
            return []
        if isinstance(action, RolesSwapped):
            return [self.events.new(vita.RolesSwapped, type="vita.roles.swapped", generator=action.generator,
                                    monitor=action.monitor)]
        if isinstance(action, Error):
            self.metrics.errors.labels(code=action.code).inc()
            return [self.events.error(realtime_error(action.code, action.message))]
        return []

    def _segment_item(self, segment_id: str) -> str:
        item_id = self._segment_items.get(segment_id)
        if item_id is None:
            item_id = self._segment_items[segment_id] = new_item_id()
        return item_id

    def segment_item(self, segment_id: str) -> str:
        """The user item of a speech segment (its id is made when the segment is first reported)."""
        return self._segment_item(segment_id)

    # --- input transcription -----------------------------------------------------------------------

    def transcription(self, item_id: str, content_index: int, event: TranscriptionEvent) -> list[ServerEvent]:
        """One step of a user item's input transcription, as GA sends it: `.delta`s, then `.completed`
        (the item then carries the transcript, for `conversation.item.retrieve`) or `.failed`."""
        ids = {"item_id": item_id, "content_index": content_index}
        if isinstance(event, TranscriptDelta):
            return [self.events.new(ConversationItemInputAudioTranscriptionDeltaEvent,
                                    type="conversation.item.input_audio_transcription.delta", delta=event.text, **ids)]
        if isinstance(event, Transcript):
            item = self.items.get(item_id)
            if item is not None and item.role == "user":
                parts = [part.model_dump(exclude_unset=True) for part in item.content]
                if content_index < len(parts) and parts[content_index].get("type") == "input_audio":
                    parts[content_index]["transcript"] = event.text
                    self.items.put(items.user_message(item_id, parts))
            return [self.events.new(ConversationItemInputAudioTranscriptionCompletedEvent,
                                    type="conversation.item.input_audio_transcription.completed",
                                    transcript=event.text, usage={"type": "duration", "seconds": event.audio_s},
                                    **ids)]
        return [self.events.new(ConversationItemInputAudioTranscriptionFailedEvent,
                                type="conversation.item.input_audio_transcription.failed",
                                error={"type": "transcription_error", "code": event.code, "message": event.message},
                                **ids)]

    def notice(self, code: str, message: str, response_id: str | None = None) -> vita.Notice:
        fields: dict[str, Any] = {"response_id": response_id} if response_id is not None else {}
        return self.events.new(vita.Notice, type="vita.notice", code=code, message=message, **fields)

    def _dropped(self, action: InputDropped) -> ServerEvent:
        response_id = next((r.response_id for r in self._responses.values() if r.request_id == action.request_id),
                           None)
        what = "camera frames" if action.modality == "video" else "image(s)"
        message = (f"This model cannot see (its vision tower is not trained): {action.count} {what} left out; "
                   "answering the rest of the turn.")
        return self.notice("input_dropped", message, response_id)

    def _classified(self, action: SegmentClassified) -> list[ServerEvent]:
        item_id = self._segment_item(action.segment_id)
        spoken = action.start_sample is not None
        where = {"audio_start_ms": (action.start_sample or 0) // SAMPLES_PER_MS,
                 "audio_end_ms": (action.end_sample or 0) // SAMPLES_PER_MS} if spoken else {}
        out: list[ServerEvent] = [self.events.new(vita.SegmentClassified, type="vita.segment.classified",
                                                item_id=item_id, kind=action.kind, ignored=action.ignored,
                                                reason=action.reason, **where)]
        if spoken and not action.ignored:  # a spoken turn joins the conversation
            out += self.audio_committed(item_id)
        return out

    def _response_started(self, action: ResponseStarted) -> list[ServerEvent]:
        modalities = self.next_modalities or self.config.output_modalities
        self.next_modalities = None
        wire = _Response(action.response_id, new_item_id(), audio="audio" in modalities, request_id=action.request_id)
        self._responses[action.response_id] = wire
        self._item_to_response[wire.item_id] = action.response_id
        item = items.assistant_message(wire.item_id, audio=wire.audio, text=None, status="in_progress")
        self.items.put(item)
        previous, self._last_item_id = self._last_item_id, wire.item_id
        return [
            self.events.new(ResponseCreatedEvent, type="response.created",
                            response=self._response(wire, "in_progress")),
            self.events.new(ResponseOutputItemAddedEvent, type="response.output_item.added",
                            response_id=wire.response_id, output_index=0, item=item),
            self.events.new(ConversationItemAdded, type="conversation.item.added", previous_item_id=previous,
                            item=item),
            self.events.new(ResponseContentPartAddedEvent, type="response.content_part.added",
                            part=items.response_part(audio=wire.audio, text=""), **self._ids(wire)),
        ]

    def _text_delta(self, action: EmitText) -> list[ServerEvent]:
        wire = self._responses.get(action.response_id)
        if wire is None or not action.delta:
            return []
        if wire.first_delta_at is None:
            wire.first_delta_at = time.monotonic()
            if self._speech_stopped_at is not None:
                self.metrics.ttft.observe(wire.first_delta_at - self._speech_stopped_at)
        wire.text += action.delta
        if wire.audio:
            return [self.events.new(ResponseAudioTranscriptDeltaEvent, type="response.output_audio_transcript.delta",
                                    delta=action.delta, **self._ids(wire))]
        return [self.events.new(ResponseTextDeltaEvent, type="response.output_text.delta", delta=action.delta,
                                **self._ids(wire))]

    def _audio_delta(self, action: EmitAudio) -> list[ServerEvent]:
        wire = self._responses.get(action.response_id)
        if wire is None or not wire.audio:
            return []
        pcm = np.asarray(action.pcm, dtype=np.float32)[action.offset : action.offset + action.num_samples]
        fmt = self.config.output_format
        if fmt.rate != OUTPUT_RATE:
            resampler = StreamResampler(OUTPUT_RATE, fmt.rate)
            pcm = np.concatenate([resampler(pcm), resampler.flush()])
        data = base64.b64encode(encode(pcm, fmt)).decode()
        return [self.events.new(ResponseAudioDeltaEvent, type="response.output_audio.delta", delta=data,
                                **self._ids(wire))]

    def _response_done(self, action: ResponseDone) -> list[ServerEvent]:
        wire = self._responses.get(action.response_id)
        if wire is None:
            return []
        ids = self._ids(wire)
        if action.status in ("completed", "incomplete") and not wire.text.strip():
            log.warning("response %s (request %s) ended %s with no visible text", wire.response_id,
                        wire.request_id, action.status)
        out: list[ServerEvent] = []
        if wire.audio:
            out.append(self.events.new(ResponseAudioDoneEvent, type="response.output_audio.done", **ids))
            out.append(self.events.new(ResponseAudioTranscriptDoneEvent, type="response.output_audio_transcript.done",
                                       transcript=wire.text, **ids))
        else:
            out.append(self.events.new(ResponseTextDoneEvent, type="response.output_text.done", text=wire.text, **ids))
        status = "completed" if action.status == "completed" else "incomplete"
        item = items.assistant_message(wire.item_id, audio=wire.audio, text=wire.text, status=status)
        self.items.put(item)
        out += [
            self.events.new(ResponseContentPartDoneEvent, type="response.content_part.done",
                            part=items.response_part(audio=wire.audio, text=wire.text), **ids),
            self.events.new(ResponseOutputItemDoneEvent, type="response.output_item.done",
                            response_id=wire.response_id, output_index=0, item=item),
            self.events.new(ConversationItemDone, type="conversation.item.done", item=item),
            self.events.new(ResponseDoneEvent, type="response.done",
                            response=self._response(wire, action.status, action.reason, item)),
        ]
        return out

    def _truncated(self, action: ResponseTruncated) -> list[ServerEvent]:
        wire = self._responses.get(action.response_id)
        item_id = wire.item_id if wire else "item_" + action.response_id
        if wire is not None:  # what the client retrieves now is what was heard, as history keeps it
            self.items.put(items.assistant_message(item_id, audio=wire.audio, text=action.text, status="incomplete"))
        return [self.events.new(ConversationItemTruncatedEvent, type="conversation.item.truncated", item_id=item_id,
                                content_index=0, audio_end_ms=action.audio_end_ms)]

    # --- shapes ------------------------------------------------------------------------------------

    @staticmethod
    def _ids(wire: _Response) -> dict[str, Any]:
        return {"response_id": wire.response_id, "item_id": wire.item_id, "output_index": 0, "content_index": 0}

    def _response(self, wire: _Response, status: str, reason: str | None = None,
                  item: ConversationItem | None = None) -> dict[str, Any]:
        """The response object. Its status details follow GA: a reason for cancelled and incomplete, an
        error (VITA's reason as its code) for failed."""
        response: dict[str, Any] = {
            "id": wire.response_id, "object": "realtime.response", "status": status, "status_details": None,
            "output": [item] if item else [], "output_modalities": ["audio" if wire.audio else "text"],
            "conversation_id": self.conversation_id,
        }
        if status == "failed":  # whose fault, as the error event says it (a prompt too long is the client's)
            kind = ErrorCode(reason).error_type if reason in ErrorCode._value2member_map_ else "server_error"
            response["status_details"] = {"type": "failed", "error": {"type": kind, "code": reason}}
        elif status in ("cancelled", "incomplete"):
            response["status_details"] = {"type": status, "reason": reason}
        return response
