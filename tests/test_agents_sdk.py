"""The OpenAI Agents SDK as a real, strict client: `agents.realtime` RealtimeAgent / RealtimeRunner pointed at us.

The SDK parses every server event with the GA models (an event without `event_id`, an assistant part typed
`text` instead of `output_text`, or a `vita.*` extension event is an error to it: it connects with
`vita_events=0`), asks for `semantic_vad`, and sends
`conversation.item.retrieve` after transcription and truncation. One session: a typed message is answered, a
spoken question is answered with audio, and a second spoken question interrupts that answer; no error event
and no exception on the way.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from tests.conftest import API_KEY
from tests.speech import compose

pytestmark = pytest.mark.vllm


def _pcm16_24k(text: str) -> bytes:
    from duplex.tts import resample

    audio, _ = compose([("silence", 0.3), ("speech", text), ("silence", 1.2)])
    pcm = np.clip(resample(audio, 16000, 24000), -1, 1)
    return (pcm * 32767).astype("<i2").tobytes()


async def _send_in_real_time(session: Any, pcm: bytes, chunk_ms: int = 40) -> None:
    step = 24000 * 2 * chunk_ms // 1000
    for i in range(0, len(pcm), step):
        await session.send_audio(pcm[i : i + step])
        await asyncio.sleep(chunk_ms / 1000 / 4)  # faster than real time, still a stream


async def _events_until(events: asyncio.Queue, done: set[str], seen: list[Any], timeout: float = 60.0) -> Any:
    async with asyncio.timeout(timeout):
        while True:
            event = await events.get()
            seen.append(event)
            if event.type in done:
                return event


async def test_agents_sdk_realtime_session_text_speech_and_barge_in(server_url: str) -> None:
    from agents.realtime import RealtimeAgent, RealtimeRunner

    agent = RealtimeAgent(name="vita", instructions="You are VITA, a helpful assistant.")
    runner = RealtimeRunner(agent, config={"model_settings": {
        "model_name": "vita", "output_modalities": ["audio"],
        "turn_detection": {"type": "semantic_vad", "interrupt_response": True},
    }})
    # Strict clients reject event types they do not know: connect without our vita.* extensions.
    url = server_url.replace("http://", "ws://") + "/v1/realtime?model=vita&vita_events=0"
    session = await runner.run(model_config={"url": url, "api_key": API_KEY})
    seen: list[Any] = []
    events: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        async for event in session:
            await events.put(event)

    async with session:
        reader = asyncio.create_task(pump())
        try:
            # 1. A typed message gets an answer (audio, and the turn ends).
            await session.send_message("What is the capital of France?")
            await _events_until(events, {"agent_end"}, seen)
            assert any(e.type == "audio" for e in seen), [e.type for e in seen]

            # 2. A spoken question is answered with audio.
            mark = len(seen)
            await _send_in_real_time(session, _pcm16_24k("What is the weather like today?"))
            await _events_until(events, {"audio"}, seen)
            assert any(e.type == "audio" for e in seen[mark:])

            # 3. A second spoken question while that answer plays interrupts it.
            mark = len(seen)
            await _send_in_real_time(session, _pcm16_24k("Tell me a story about a cat instead."))
            await _events_until(events, {"audio_interrupted"}, seen)
            await _events_until(events, {"audio"}, seen)  # and the new question is answered
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    errors = [str(e.error)[-700:] for e in seen if e.type == "error"]
    assert errors == [], "\n\n".join(errors)
    raw_types = {e.data.type for e in seen if e.type == "raw_model_event"}
    assert "error" not in raw_types and "exception" not in raw_types, raw_types
    history = [item for e in seen if e.type == "history_updated" for item in e.history]
    assert any(getattr(item, "role", None) == "assistant" for item in history)
