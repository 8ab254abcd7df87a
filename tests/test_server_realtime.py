"""WS /v1/realtime against a real server process: the openai SDK's realtime client, raw sockets for
malformed events, auth and admission."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import websockets
from openai import AsyncOpenAI

from duplex.tts import resample
from tests.conftest import API_KEY
from tests.speech import compose

pytestmark = pytest.mark.vllm


def _pcm16_24k(audio16k: np.ndarray) -> bytes:
    return (np.clip(resample(audio16k, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()


def _question(text: str = "What is the weather like today?") -> bytes:
    audio, _ = compose([("silence", 0.3), ("speech", text), ("silence", 1.0)])
    return _pcm16_24k(audio)


async def _recv_until(conn, types: set[str], timeout: float = 30.0) -> list:
    events = []
    async with asyncio.timeout(timeout):
        while True:
            event = await conn.recv()
            events.append(event)
            if event.type in types:
                return events


async def test_openai_sdk_realtime_session_speech_to_answer(server_url: str) -> None:
    client = AsyncOpenAI(base_url=server_url + "/v1", api_key=API_KEY)
    async with client.realtime.connect(model="vita") as conn:
        created = await conn.recv()
        assert created.type == "session.created"
        await conn.session.update(session={"type": "realtime", "output_modalities": ["audio"],
                                           "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}}}})
        pcm = _question()
        for i in range(0, len(pcm), 4800):  # 100 ms per event
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 4800]).decode())
        events = await _recv_until(conn, {"response.done"})
        types = [e.type for e in events]
        for expected in ("session.updated", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                         "input_audio_buffer.committed", "response.created", "response.output_audio.delta"):
            assert expected in types, f"{expected} missing from {types}"
        assert types.index("input_audio_buffer.speech_started") < types.index("input_audio_buffer.speech_stopped")
        transcript = "".join(e.delta for e in events if e.type == "response.output_audio_transcript.delta")
        assert transcript and "☞" not in transcript
        audio = b"".join(base64.b64decode(e.delta) for e in events if e.type == "response.output_audio.delta")
        assert len(audio) > 2 * 2400  # more than 0.1 s at 24 kHz
        done = events[-1]  # the served tiny model never says EOS: every answer stops at max_tokens
        assert (done.response.status, done.response.status_details.reason) == ("incomplete", "max_output_tokens")

        # text-only, typed question, then cancel it while it runs
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await conn.conversation.item.create(
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me more."}]}
        )
        await conn.response.create()
        events = await _recv_until(conn, {"response.created"})
        await conn.response.cancel()
        events = await _recv_until(conn, {"response.done"})
        assert events[-1].response.status == "cancelled"
        assert events[-1].response.status_details.reason == "client_cancelled"


async def test_truncate_cuts_the_answer_to_what_was_played(server_url: str) -> None:
    client = AsyncOpenAI(base_url=server_url + "/v1", api_key=API_KEY)
    async with client.realtime.connect(model="vita") as conn:
        await conn.recv()
        pcm = _question("Please tell me a story.")
        for i in range(0, len(pcm), 9600):
            await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i : i + 9600]).decode())
        events = await _recv_until(conn, {"response.output_audio.delta"})
        item_id = next(e for e in events if e.type == "response.output_item.added").item.id
        await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=150)
        events = await _recv_until(conn, {"conversation.item.truncated"})
        truncated = events[-1]
        assert truncated.item_id == item_id and truncated.audio_end_ms == 150


async def _raw(url: str, **kw):
    ws_url = url.replace("http://", "ws://") + "/v1/realtime?model=vita"
    return await websockets.connect(ws_url, **kw)


async def _next_json(ws, timeout: float = 20.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def _until(ws, kind: str, timeout: float = 30.0) -> list[dict]:
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            event = await _next_json(ws)
            seen.append(event)
            if event["type"] == kind:
                return seen


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ("{not json", "invalid_json"),
        ('["a list"]', "invalid_event"),
        ('{"no_type": 1}', "missing_type"),
        ('{"type": "no.such.event"}', "unknown_event_type"),
        ('{"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": "soon"}', "invalid_value"),
        ('{"type": "input_audio_buffer.append", "audio": "%%% not base64 %%%"}', "invalid_audio"),
        ('{"type": "input_audio_buffer.append", "audio": "' + base64.b64encode(b"abc").decode() + '"}', "invalid_audio"),
        ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/flac"}}}}}',
         "invalid_audio_format"),
        ('{"type": "vita.frame.append", "image": "' + base64.b64encode(b"not an image").decode() + '"}', "invalid_image"),
        ('{"type": "vita.frame.append", "image": "file:///etc/passwd"}', "invalid_image"),
        ('{"type": "response.cancel"}', "response_cancel_not_active"),
        ('{"type": "session.update", "session": {"instructions": "' + "x" * 40_000 + '"}}', "instructions_too_long"),
    ],
)
async def test_malformed_events_get_an_error_and_the_session_survives(server_url: str, payload: str, code: str) -> None:
    ws = await _raw(server_url, additional_headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        assert (await _next_json(ws))["type"] == "session.created"
        await ws.send(payload)
        error = await _next_json(ws)
        assert error["type"] == "error" and error["error"]["code"] == code, error
        assert error["error"]["message"]
        # still alive: a typed question gets an answer
        await ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"]}}))
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello?"}]}}))
        await ws.send(json.dumps({"type": "response.create"}))
        events = await _until(ws, "response.done")
        assert events[-1]["response"]["status"] == "incomplete"
        assert any(e["type"] == "response.output_text.delta" for e in events)
    finally:
        await ws.close()


async def test_max_output_tokens_is_honoured_and_capped_by_the_server(server_url: str) -> None:
    ws = await _raw(server_url, additional_headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        created = await _next_json(ws)
        assert created["session"]["max_output_tokens"] == 48  # the test server's VITA_MAX_TOKENS
        await ws.send(json.dumps({"type": "session.update", "session": {
            "output_modalities": ["text"], "max_output_tokens": 4}}))
        assert (await _until(ws, "session.updated"))[-1]["session"]["max_output_tokens"] == 4
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Count to one thousand."}]}}))
        await ws.send(json.dumps({"type": "response.create"}))
        events = await _until(ws, "response.done")
        deltas = [e for e in events if e["type"] == "response.output_text.delta"]
        assert 1 <= len(deltas) <= 4, len(deltas)  # the state token comes on top: at most 4 visible tokens
        assert events[-1]["response"]["status_details"]["reason"] == "max_output_tokens"
        for asked in ("inf", 10**6):  # above the server's ceiling: the ceiling
            await ws.send(json.dumps({"type": "session.update", "session": {"max_output_tokens": asked}}))
            assert (await _until(ws, "session.updated"))[-1]["session"]["max_output_tokens"] == 48
        await ws.send(json.dumps({"type": "session.update", "session": {"max_output_tokens": 0}}))
        error = await _next_json(ws)
        assert error["type"] == "error" and error["error"]["code"] == "invalid_value", error
    finally:
        await ws.close()


async def test_system_items_cannot_grow_the_instructions_without_bound(server_url: str) -> None:
    ws = await _raw(server_url, additional_headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        await _next_json(ws)
        for n in range(3):  # each adds 12 000 characters; the third would pass the 32 768 limit
            await ws.send(json.dumps({"type": "conversation.item.create", "event_id": f"sys{n}", "item": {
                "type": "message", "role": "system", "content": [{"type": "input_text", "text": str(n) * 12_000}]}}))
            reply = await _next_json(ws)
            while reply["type"] == "conversation.item.done":  # the previous item's
                reply = await _next_json(ws)
            if n < 2:
                assert reply["type"] == "conversation.item.added", reply
        assert reply["type"] == "error" and reply["error"]["code"] == "instructions_too_long", reply
        assert reply["error"]["event_id"] == "sys2"
        await ws.send(json.dumps({"type": "session.update", "session": {}}))
        updated = await _until(ws, "session.updated")
        assert updated[-1]["session"]["instructions"] == "0" * 12_000 + "\n" + "1" * 12_000  # the refused one left no trace
    finally:
        await ws.close()


async def test_oversize_event_is_refused_with_an_error(server_url: str) -> None:
    ws = await _raw(server_url, additional_headers={"Authorization": f"Bearer {API_KEY}"}, max_size=None)
    try:
        await _next_json(ws)
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (16 << 20)}))
        error = await _next_json(ws)
        assert error["error"]["code"] == "event_too_large"
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert (await _next_json(ws))["type"] == "input_audio_buffer.cleared"
    finally:
        await ws.close()


async def test_auth_on_the_websocket(server_url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        ws = await _raw(server_url, additional_headers=headers)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await _next_json(ws)
        assert closed.value.rcvd.code == 1008
    # browsers: the key as a subprotocol
    ws = await _raw(server_url, subprotocols=["realtime", f"openai-insecure-api-key.{API_KEY}"])
    assert (await _next_json(ws))["type"] == "session.created"
    await ws.close()


async def test_admission_closes_with_1013_at_max_sessions(server_url: str) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    open_ = [await _raw(server_url, additional_headers=headers) for _ in range(4)]
    try:
        for ws in open_:
            assert (await _next_json(ws))["type"] == "session.created"
        extra = await _raw(server_url, additional_headers=headers)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await _next_json(extra)
        assert closed.value.rcvd.code == 1013 and "capacity" in closed.value.rcvd.reason
    finally:
        for ws in open_:
            await ws.close()
    await asyncio.sleep(0.3)
    ws = await _raw(server_url, additional_headers=headers)  # a slot is free again
    assert (await _next_json(ws))["type"] == "session.created"
    await ws.close()
