"""Conformance with the protocol we claim to speak, checked by the SDK's own types, strictly.

Every server event of full realtime sessions (text, speech in, audio out, typed items, images, errors,
barge-in, truncate, retrieve, manual turns, semantic_vad) is validated against `openai.types.realtime`,
the model picked by its `type`, with `strict=True` (no coercion) and `extra="forbid"` (OpenAI's models
allow extra fields, so a misspelt or invented field would otherwise pass); `vita.*` events against ours
(server/wire/vita_events.py, which forbid extras themselves). Every `event_id` must be there and unique.
The HTTP API likewise: chat completions and their SSE chunks against `openai.types.chat`, /v1/models
against `openai.types.Model`. Validation runs on the raw JSON, not on what a lenient client parsed.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import httpx
import numpy as np
import pydantic
import pytest
import websockets
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.realtime import RealtimeServerEvent

from duplex.tts import resample
from server.wire.vita_events import VITA_SERVER_EVENTS
from tests.conftest import API_KEY
from tests.speech import compose

pytestmark = pytest.mark.vllm

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PNG = (Path(__file__).parent / "data" / "house.png").read_bytes()


def _ga_models() -> dict[str, type[pydantic.BaseModel]]:
    union = get_args(RealtimeServerEvent)[0]  # Annotated[Union[...], PropertyInfo(discriminator="type")]
    return {get_args(m.model_fields["type"].annotation)[0]: m for m in get_args(union)}


GA_MODELS = _ga_models()
SEEN_EVENT_IDS: set[str] = set()  # across every session of this module: ids never repeat


def problems_with(raw: str) -> list[str]:
    """Why this server event does not conform (empty: it does)."""
    data = json.loads(raw)
    kind = data.get("type")
    model = GA_MODELS.get(kind) or VITA_SERVER_EVENTS.get(kind)
    if model is None:
        return [f"{kind!r} is neither a GA server event nor one of ours"]
    out = []
    try:
        model.model_validate_json(raw, strict=True, extra="forbid")
    except pydantic.ValidationError as exc:
        out += [f"{kind}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5]]
    event_id = data.get("event_id")
    if isinstance(event_id, str):
        if event_id in SEEN_EVENT_IDS:
            out.append(f"{kind}: event_id {event_id!r} was used before")
        SEEN_EVENT_IDS.add(event_id)
    return out


class Session:
    """A raw realtime socket whose every received event is checked; `invalid` collects what failed."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.events: list[dict] = []
        self.invalid: list[str] = []

    @classmethod
    async def open(cls, server_url: str, query: str = "") -> Session:
        ws = await websockets.connect(server_url.replace("http://", "ws://") + "/v1/realtime?model=vita" + query,
                                      additional_headers=AUTH, max_size=None)
        session = cls(ws)
        await session.until("session.created")
        return session

    async def send(self, event: dict | str) -> None:
        await self.ws.send(event if isinstance(event, str) else json.dumps(event))

    async def next(self, timeout: float = 60.0) -> dict:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        self.invalid += problems_with(raw)
        event = json.loads(raw)
        self.events.append(event)
        return event

    async def until(self, kind: str | Callable[[dict], bool], timeout: float = 60.0) -> list[dict]:
        wanted = kind if callable(kind) else (lambda e: e["type"] == kind)
        seen: list[dict] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    seen.append(await self.next())
                    if wanted(seen[-1]):
                        return seen
        except TimeoutError:
            raise AssertionError(f"no {kind} in {timeout:.0f} s; got {[e['type'] for e in seen]}; "
                                 f"nonconforming so far: {self.invalid[:10]}") from None

    def assert_conforming(self) -> None:
        assert not self.invalid, f"{len(self.invalid)} problems:\n" + "\n".join(self.invalid[:40])

    async def error_for(self, event: dict | str) -> dict:
        await self.send(event)
        return (await self.until("error"))[-1]["error"]

    def types(self) -> set[str]:
        return {e["type"] for e in self.events}

    async def close(self) -> None:
        await self.ws.close()


def _speech_24k(text: str, trailing_s: float = 1.0) -> bytes:
    audio, _ = compose([("silence", 0.3), ("speech", text), ("silence", trailing_s)])
    return (np.clip(resample(audio, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()


async def _stream_audio(session: Session, pcm: bytes, chunk: int = 9600) -> None:
    for i in range(0, len(pcm), chunk):  # 200 ms per event
        audio = base64.b64encode(pcm[i : i + chunk]).decode()
        await session.send({"type": "input_audio_buffer.append", "audio": audio})


def _user_text(text: str) -> dict:
    return {"type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}


# --- realtime ----------------------------------------------------------------------------------------


async def test_text_items_images_errors_retrieve_and_manual_turns_conform(server_url: str) -> None:
    s = await Session.open(server_url)
    try:
        await s.send({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["text"], "instructions": "Be brief.", "max_output_tokens": 6}})
        await s.until("session.updated")
        await s.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "system", "content": [{"type": "input_text", "text": "Answer in English."}]}})
        await s.until("conversation.item.done")

        # a typed question about an image
        png = "data:image/png;base64," + base64.b64encode(PNG).decode()
        await s.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is in this picture?"}, {"type": "input_image", "image_url": png}]}})
        user_item = (await s.until("conversation.item.done"))[-1]["item"]
        await s.send({"type": "response.create"})
        done = (await s.until("response.done"))[-1]["response"]
        s.assert_conforming()
        assert [p["type"] for p in done["output"][0]["content"]] == ["output_text"]

        # retrieve: the user's item (media by kind, not echoed), the answer, and one that does not exist
        await s.send({"type": "conversation.item.retrieve", "item_id": user_item["id"]})
        retrieved = (await s.until("conversation.item.retrieved"))[-1]["item"]
        assert [p["type"] for p in retrieved["content"]] == ["input_text", "input_image"]
        await s.send({"type": "conversation.item.retrieve", "item_id": done["output"][0]["id"]})
        assert (await s.until("conversation.item.retrieved"))[-1]["item"] == done["output"][0]
        error = await s.error_for({"type": "conversation.item.retrieve", "item_id": "item_nope", "event_id": "r1"})
        assert (error["code"], error["event_id"]) == ("item_not_found", "r1")

        # errors of every layer keep the session, and each is a GA error event
        for bad, code in [
            ("{not json", "invalid_json"),
            ({"type": "no.such.event"}, "unknown_event_type"),
            ({"type": "input_audio_buffer.append", "audio": "%%%"}, "invalid_audio"),
            ({"type": "vita.frame.append", "image": base64.b64encode(b"not an image").decode()}, "invalid_image"),
            ({"type": "conversation.item.delete", "item_id": user_item["id"]}, "item_delete_unsupported"),
            ({"type": "output_audio_buffer.clear"}, "unsupported_event"),
            ({"type": "response.cancel"}, "response_cancel_not_active"),
        ]:
            assert (await s.error_for(bad))["code"] == code

        # the VITA extension for typed text, then a response cancelled while it runs
        await s.send({"type": "vita.text.append", "text": "Hello there?"})
        await s.until("response.done")
        await s.send(_user_text("Tell me more."))
        await s.send({"type": "response.create"})
        await s.until("response.created")
        await s.send({"type": "response.cancel"})
        assert (await s.until("response.done"))[-1]["response"]["status_details"]["reason"] == "client_cancelled"

        # manual turns: append, commit, response.create; then semantic_vad is accepted and reported
        await s.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": None}}}})
        assert (await s.until("session.updated"))[-1]["session"]["audio"]["input"]["turn_detection"] is None
        await _stream_audio(s, _speech_24k("Hello there.", trailing_s=0.2))
        await s.send({"type": "input_audio_buffer.commit"})
        await s.until("conversation.item.done")
        await s.send({"type": "response.create"})
        await s.until("response.done")
        await s.send({"type": "input_audio_buffer.clear"})
        await s.until("input_audio_buffer.cleared")
        await s.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "semantic_vad", "eagerness": "low", "interrupt_response": True}}}}})
        updated = (await s.until(lambda e: e["type"] in ("session.updated", "error")))[-1]
        assert updated["type"] == "session.updated", updated
        assert updated["session"]["audio"]["input"]["turn_detection"] == {
            "type": "semantic_vad", "eagerness": "low", "create_response": True, "interrupt_response": True}

        s.assert_conforming()
        assert {"conversation.item.added", "conversation.item.done", "response.output_item.added",
                "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                "response.content_part.done", "response.output_item.done", "input_audio_buffer.committed",
                "conversation.item.retrieved", "error"} <= s.types()
    finally:
        await s.close()


async def test_speech_audio_out_barge_in_and_truncate_conform(server_url: str) -> None:
    s = await Session.open(server_url)
    try:
        await s.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio"]}})
        await s.until("session.updated")
        await _stream_audio(s, _speech_24k("Please tell me a long story."))
        first = (await s.until("response.created"))[-1]["response"]["id"]
        await s.until("response.output_audio.delta")
        s.assert_conforming()

        # barge-in: a second question while the first answer plays
        await _stream_audio(s, _speech_24k("Stop, what time is it?"))
        second = (await s.until(lambda e: e["type"] == "response.created" and e["response"]["id"] != first))[-1]
        seen = {e["type"] for e in s.events}
        assert "vita.output.paused" in seen
        cancelled = next(e["response"] for e in s.events
                         if e["type"] == "response.done" and e["response"]["id"] == first)
        assert (cancelled["status"], cancelled["status_details"]["reason"]) == ("cancelled", "turn_detected")

        # truncate the second answer to what was played, then read it back as history keeps it
        item_id = (await s.until("response.output_item.added"))[-1]["item"]["id"]
        await s.until("response.output_audio.delta")
        await s.send({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                      "audio_end_ms": 300})
        truncated = (await s.until("conversation.item.truncated"))[-1]
        assert (truncated["item_id"], truncated["audio_end_ms"]) == (item_id, 300)
        await s.send({"type": "conversation.item.retrieve", "item_id": item_id})
        item = (await s.until("conversation.item.retrieved"))[-1]["item"]
        assert [p["type"] for p in item["content"]] == ["output_audio"] and item["status"] == "incomplete"
        assert second["response"]["output_modalities"] == ["audio"]

        # an audio item typed in, answered with audio, and cancelled
        pcm = _speech_24k("What is the weather like?", trailing_s=0.1)
        await s.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_audio", "audio": base64.b64encode(pcm).decode()}]}})
        await s.send({"type": "response.create"})
        await s.until("response.output_audio.delta")
        await s.send({"type": "response.cancel"})
        await s.until("response.done")

        s.assert_conforming()
        assert {"input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                "input_audio_buffer.committed", "vita.segment.classified", "response.output_audio.delta",
                "response.output_audio_transcript.delta", "response.output_audio.done",
                "response.output_audio_transcript.done", "output_audio_buffer.cleared",
                "conversation.item.truncated", "conversation.item.retrieved"} <= s.types()
    finally:
        await s.close()


async def test_session_created_reports_a_ga_session_object(server_url: str) -> None:
    s = await Session.open(server_url)
    try:
        session = s.events[0]["session"]
        assert session["type"] == "realtime" and "id" not in session and "vita" not in session
        assert session["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
        s.assert_conforming()
    finally:
        await s.close()


async def test_input_transcription_events_conform(server_url: str) -> None:
    """`audio.input.transcription` on: every committed user audio item gets `.delta`s then `.completed`
    (or `.failed`), after the item was added; `retrieve` then shows the transcript; null turns it off."""
    s = await Session.open(server_url)
    try:
        await s.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"],
                      "max_output_tokens": 4, "audio": {"input": {"transcription": {"model": "whisper-1"}}}}})
        effect = (await s.until("session.updated"))[-1]["session"]["audio"]["input"]["transcription"]
        assert effect == {"model": "pocketsphinx-en-us", "language": "en"}  # what transcribes, not what was asked

        # a spoken turn (server VAD)
        await _stream_audio(s, _speech_24k("What is the weather like today?"))
        completed = (await s.until("conversation.item.input_audio_transcription.completed"))[-1]
        item_id = next(e["item_id"] for e in s.events if e["type"] == "input_audio_buffer.committed")
        kinds = [e["type"] for e in s.events if e.get("item_id") == item_id or e.get("item", {}).get("id") == item_id]
        assert kinds.index("conversation.item.added") < kinds.index(
            "conversation.item.input_audio_transcription.delta") < kinds.index(
            "conversation.item.input_audio_transcription.completed")
        assert completed["item_id"] == item_id and completed["content_index"] == 0 and completed["transcript"]
        assert completed["usage"]["type"] == "duration" and completed["usage"]["seconds"] > 1
        if "response.done" not in s.types():  # transcription runs beside the answer: either may end first
            await s.until("response.done")

        # a typed item with text then audio: the audio is content part 1; retrieve shows its transcript
        pcm = base64.b64encode(_speech_24k("Hello there.", trailing_s=0.2)).decode()
        await s.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "id": "item_ta",
                      "content": [{"type": "input_text", "text": "Listen:"}, {"type": "input_audio", "audio": pcm}]}})
        typed = (await s.until(lambda e: e["type"] == "conversation.item.input_audio_transcription.completed"
                               and e["item_id"] == "item_ta"))[-1]
        assert typed["content_index"] == 1
        await s.send({"type": "conversation.item.retrieve", "item_id": "item_ta"})
        parts = (await s.until("conversation.item.retrieved"))[-1]["item"]["content"]
        assert parts[1] == {"type": "input_audio", "transcript": typed["transcript"]}

        # a language the backend cannot do: the item's transcription fails, the session goes on
        await s.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "transcription": {"language": "fr"}}}}})
        await s.until("session.updated")
        await s.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "id": "item_fr",
                      "content": [{"type": "input_audio", "audio": pcm}]}})
        failed = (await s.until(lambda e: e["type"].startswith("conversation.item.input_audio_transcription.")
                                and e["item_id"] == "item_fr"))[-1]
        assert failed["type"] == "conversation.item.input_audio_transcription.failed"
        assert failed["error"]["code"] == "unsupported_language", failed

        # off again: reported as null, and the next item gets no transcription
        await s.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "transcription": None}}}})
        assert (await s.until("session.updated"))[-1]["session"]["audio"]["input"]["transcription"] is None
        await s.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "id": "item_off",
                      "content": [{"type": "input_audio", "audio": pcm}]}})
        await s.until(lambda e: e["type"] == "conversation.item.done" and e["item"]["id"] == "item_off")
        await asyncio.sleep(3)  # pocketsphinx took well under a second for the same clip above
        await s.send({"type": "conversation.item.retrieve", "item_id": "item_off"})
        assert (await s.until("conversation.item.retrieved"))[-1]["item"]["content"][0]["transcript"] is None
        assert not [e for e in s.events if e.get("item_id") == "item_off" and "transcription" in e["type"]]
        s.assert_conforming()
    finally:
        await s.close()


async def test_a_strict_ga_client_can_turn_the_vita_events_off(server_url: str) -> None:
    """The OpenAI Agents SDK reports every event outside the GA union as an error: `?vita_events=0`."""
    s = await Session.open(server_url, "&vita_events=0")
    try:
        await s.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["text"],
                                                            "max_output_tokens": 4}})
        await s.send({"type": "vita.text.append", "text": "Hello there?"})  # classified (vita.*) and answered
        await s.until("response.done")
        s.assert_conforming()
        assert not [t for t in s.types() if t.startswith("vita.")]
    finally:
        await s.close()


# --- HTTP --------------------------------------------------------------------------------------------


def _without_extensions(body: dict) -> dict:
    """Our documented chat extensions, checked and removed: `vita` (the state token, warnings, notices) at the
    top, and `delta.audio` in streamed chunks (OpenAI streams audio so, but the SDK's ChoiceDelta lacks it)."""
    body = json.loads(json.dumps(body))
    vita = body.pop("vita", None)
    assert vita is None or set(vita) <= {"state", "warning", "notice"}, vita
    for choice in body.get("choices", []):
        audio = choice.get("delta", {}).pop("audio", None)
        assert audio is None or set(audio) <= {"id", "data", "transcript", "expires_at"}, audio
    return body


def _post_chat(server_url: str, **request: Any) -> httpx.Response:
    body = {"model": "vita", "messages": [{"role": "user", "content": "Hello, who are you?"}], "max_tokens": 8,
            **request}
    response = httpx.post(server_url + "/v1/chat/completions", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    return response


@pytest.mark.parametrize("modalities", [["text"], ["text", "audio"]])
def test_chat_completions_conform(server_url: str, modalities: list[str]) -> None:
    extra = {"modalities": modalities, "audio": {"voice": "alloy", "format": "wav"}} if "audio" in modalities else {}
    body = _post_chat(server_url, **extra).json()
    ChatCompletion.model_validate(_without_extensions(body), strict=True, extra="forbid")


@pytest.mark.parametrize("modalities", [["text"], ["text", "audio"]])
def test_chat_completion_chunks_conform(server_url: str, modalities: list[str]) -> None:
    extra = {"modalities": modalities, "audio": {"voice": "alloy", "format": "pcm16"}} if "audio" in modalities else {}
    text = _post_chat(server_url, stream=True, stream_options={"include_usage": True}, **extra).text
    lines = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]" and len(lines) > 3
    for line in lines[:-1]:
        ChatCompletionChunk.model_validate(_without_extensions(json.loads(line)), strict=True, extra="forbid")


def test_models_conform(server_url: str) -> None:
    body = httpx.get(server_url + "/v1/models", headers=AUTH, timeout=10).json()
    assert body["object"] == "list" and set(body) == {"object", "data"} and len(body["data"]) == 1
    for entry in body["data"]:
        Model.model_validate(entry, strict=True, extra="forbid")
