"""server/realtime_conversation.py without a server: the duplex session's actions become server events
that validate strictly against the SDK's GA models (vita.* against ours), for every response ending the
controller documents, and retrieve returns what the client was told (truncated answers as history keeps
them)."""

from __future__ import annotations

import json
from typing import Any, get_args

import numpy as np
import pydantic
import pytest
from openai.types.realtime import RealtimeServerEvent

from duplex.events import (
    ClearOutput,
    EmitAudio,
    EmitText,
    Error,
    PauseOutput,
    ResponseDone,
    ResponseStarted,
    ResponseTruncated,
    ResumeOutput,
    RolesSwapped,
    SegmentClassified,
    SpeechStartedNotice,
    SpeechStoppedNotice,
)
from server.realtime_config import RealtimeConfig
from server.realtime_conversation import Conversation
from server.wire.audio_codec import AudioFormat
from server.wire.client_events import TurnDetection
from server.wire.server_events import ServerEventEncoder
from server.wire.vita_events import VITA_SERVER_EVENTS

_UNION = get_args(get_args(RealtimeServerEvent)[0])
GA = {get_args(m.model_fields["type"].annotation)[0]: m for m in _UNION}


class _Instrument:
    def observe(self, value: float) -> None: ...
    def labels(self, **_: str) -> _Instrument:
        return self
    def inc(self) -> None: ...


class _Metrics:
    ttft = barge_in = errors = _Instrument()


def _conversation(modality: str = "audio", fmt: AudioFormat | None = None) -> Conversation:
    defaults = TurnDetection(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500, create_response=True,
                             interrupt_response=True)
    config = RealtimeConfig(model="vita", max_output_tokens=48, output_modalities=[modality],  # type: ignore[list-item]
                            vad_defaults=defaults, turn_detection=defaults, output_format=fmt or AudioFormat())
    return Conversation(ServerEventEncoder(), config, _Metrics(), "sess_test")  # type: ignore[arg-type]


def _wire(conversation: Conversation, actions: list[Any]) -> list[dict]:
    out = []
    for action in actions:
        for event in conversation.events_for(action):
            text = conversation.events.encode(event)
            data = json.loads(text)
            model = GA.get(data["type"]) or VITA_SERVER_EVENTS[data["type"]]
            model.model_validate_json(text, strict=True, extra="forbid")
            out.append(data)
    return out


def _answer(response_id: str, status: str, reason: str | None) -> list[Any]:
    pcm = np.zeros(2400, np.float32)
    return [ResponseStarted(response_id, "req", "seg", "speech"), EmitText(response_id, "Hello"),
            EmitAudio(response_id, 0, pcm, 2400), ResponseDone(response_id, status, reason)]  # type: ignore[arg-type]


@pytest.mark.parametrize(("status", "reason"), [
    ("completed", None), ("incomplete", "max_output_tokens"), ("cancelled", "turn_detected"),
    ("cancelled", "client_cancelled"), ("failed", "engine_error"), ("failed", "engine_aborted"),
])
@pytest.mark.parametrize("modality", ["audio", "text"])
def test_every_response_ending_is_ga(status: str, reason: str | None, modality: str) -> None:
    events = _wire(_conversation(modality), _answer("resp_1", status, reason))
    done = events[-1]["response"]
    assert done["status"] == status
    part = "output_audio" if modality == "audio" else "output_text"
    assert [p["type"] for p in done["output"][0]["content"]] == [part]


def test_a_spoken_turn_barge_in_and_truncate_are_ga_and_retrievable() -> None:
    conversation = _conversation(fmt=AudioFormat("pcmu", 8000))
    actions = [SpeechStartedNotice("seg", 1600), SpeechStoppedNotice("seg", 32000),
               SegmentClassified("seg", "query", 1600, 32000), *_answer("resp_1", "cancelled", "turn_detected"),
               PauseOutput("resp_1"), ResumeOutput("resp_1"), ClearOutput("resp_1"), RolesSwapped(1, 0),
               ResponseTruncated("resp_1", 250, "Hel"), SpeechStartedNotice("seg2", 40000),
               SpeechStoppedNotice("seg2", 40100, committed=False),
               SegmentClassified("seg2", "noise", ignored=True, reason="noise"), Error("engine_error", "boom")]
    events = _wire(conversation, actions)
    ids = [e["event_id"] for e in events]
    assert len(set(ids)) == len(ids)
    types = [e["type"] for e in events]
    assert "input_audio_buffer.committed" in types and "vita.segment.discarded" in types
    assert events[-1]["error"]["type"] == "server_error"
    item_id = next(e["item"]["id"] for e in events if e["type"] == "response.output_item.added")
    retrieved = conversation.retrieved(item_id)
    assert retrieved is not None and retrieved.item.content[0].transcript == "Hel"  # type: ignore[union-attr]
    user_id = next(e["item_id"] for e in events if e["type"] == "input_audio_buffer.committed")
    assert conversation.retrieved(user_id) is not None and conversation.retrieved("item_nope") is None


def test_the_item_log_is_bounded_by_count_and_text() -> None:
    conversation = _conversation("text")
    conversation.items.max_items = 3
    for n in range(5):
        conversation.user_item(f"item_{n}", [{"type": "input_text", "text": "x" * 10}])
    assert conversation.retrieved("item_1") is None and conversation.retrieved("item_4") is not None
    conversation.items.max_chars = 15
    conversation.user_item("item_big", [{"type": "input_text", "text": "y" * 100}])
    assert conversation.retrieved("item_big") is not None and conversation.retrieved("item_4") is None


def test_a_mistyped_event_never_reaches_the_wire() -> None:
    with pytest.raises(pydantic.ValidationError):
        _wire(_conversation(), [ResponseStarted("resp_1", "req", "seg", "speech"),
                                ResponseDone("resp_1", "cancelled", "an_unknown_reason")])  # type: ignore[arg-type]
