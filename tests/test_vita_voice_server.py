"""The vita voice through the real server: one `vita-duplex serve` of a tiny VITA-1.5 that ships its speech decoder
(`vita_tts_ckpt/`), so the default `tts: auto` speaks with it: two LLM engines and the voice's own vLLM engine on
CPU, real sockets, real speech in.

One server process serves every test here (each costs a minute to start on two cores). The tiny decoder never
says eos, so every sentence speaks its full 1000 codec tokens (25 s) as upstream's cap allows: a sentence is still
being decoded whenever a barge-in lands.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import websockets
from prometheus_client.parser import text_string_to_metric_families

from duplex.tts import resample
from tests.conftest import API_KEY, ServerProcess
from tests.speech import compose

pytestmark = pytest.mark.vllm
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ABORT_BOUND_S = 0.020  # the bound: a barge-in's ☞ to the voice's vLLM requests aborted


@pytest.fixture(scope="module")
def voiced_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny VITA-1.5 with its voice; its first token is always ☞ and its answers run to max_tokens."""
    from models.tiny import build_tiny

    return build_tiny("vita15", tmp_path_factory.mktemp("voiced") / "query", seed=5, force="query",
                      never_stop=True, tts=True)


@pytest.fixture(scope="module")
def voice_server(voiced_model: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(voiced_model, tmp_path_factory.mktemp("voice-server-log"), "--api-key", API_KEY,
                         "--max-sessions", "4", env={"VITA_MAX_TOKENS": "24"})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _metrics(url: str) -> dict[str, float]:
    """/metrics as {sample name with labels: value}, e.g. 'vita_tts_stop_seconds_bucket{le="0.02"}'."""
    request = urllib.request.Request(url + "/metrics", headers=AUTH)
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


async def _metric_until(url: str, name: str, ok, timeout: float = 10.0) -> float:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = (await asyncio.to_thread(_metrics, url)).get(name, 0.0)
        if ok(value) or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


def _speech_24k(text: str) -> bytes:
    audio, _ = compose([("silence", 0.3), ("speech", text), ("silence", 1.0)])
    return (np.clip(resample(audio, 16000, 24000), -1, 1) * 32767).astype("<i2").tobytes()


class _Session:
    def __init__(self, ws: websockets.ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict] = []

    async def send(self, event: dict) -> None:
        await self.ws.send(json.dumps(event))

    async def stream(self, pcm: bytes) -> None:
        for i in range(0, len(pcm), 4800):  # 100 ms per event
            await self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + 4800]).decode()})

    async def until(self, pred, timeout: float = 90.0) -> dict:  # type: ignore[no-untyped-def]
        async with asyncio.timeout(timeout):
            while True:
                event = json.loads(await self.ws.recv())
                self.events.append(event)
                assert event["type"] != "error" or event["error"].get("code") == "response_cancel_not_active", event
                if pred(event):
                    return event


async def test_spoken_answer_is_paused_at_onset_and_its_tts_aborted_within_20ms_of_the_verdict(
    voice_server: ServerProcess,
) -> None:
    url = voice_server.url
    assert "vita voice ready" in voice_server.log()  # tts: auto found vita_tts_ckpt/ and started its engine
    ws = await websockets.connect(url.replace("http://", "ws://") + "/v1/realtime?model=vita", additional_headers=AUTH)
    s = _Session(ws)
    try:
        await s.send({"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio"]}})
        await s.until(lambda e: e["type"] == "session.updated")

        # 1. A spoken question, answered in the vita voice.
        await s.stream(_speech_24k("Please tell me a long story."))
        first = (await s.until(lambda e: e["type"] == "response.created"))["response"]["id"]
        delta = await s.until(lambda e: e["type"] == "response.output_audio.delta")
        pcm = np.frombuffer(base64.b64decode(delta["delta"]), "<i2")
        assert pcm.size and np.abs(pcm).max() > 100  # 24 kHz PCM16 from the speech decoder + TiCodec, not silence
        assert await _metric_until(url, "vita_tts_requests_in_flight", lambda v: v >= 1) >= 1  # decoding in vLLM

        # 2. Barge-in: a second question while the answer plays.
        mark = len(s.events)
        await s.stream(_speech_24k("Stop, what time is it?"))
        second = (await s.until(lambda e: e["type"] == "response.created" and e["response"]["id"] != first))
        after = s.events[mark:]
        types = [e["type"] for e in after]
        onset = types.index("input_audio_buffer.speech_started")
        paused = next(i for i, e in enumerate(after)
                      if e["type"] == "vita.output.paused" and e["response_id"] == first)
        stopped = types.index("input_audio_buffer.speech_stopped")
        verdict = next(i for i, e in enumerate(after) if e["type"] == "vita.segment.classified")
        # paused at speech onset (with it, while the user still speaks), not at VITA's verdict on the turn
        assert max(onset, paused) < stopped < verdict, types
        assert (after[verdict]["kind"], after[verdict]["ignored"]) == ("query", False)
        done = next(e["response"] for e in after if e["type"] == "response.done" and e["response"]["id"] == first)
        assert (done["status"], done["status_details"]["reason"]) == ("cancelled", "turn_detected")
        # The ☞ cancelled the answer's speech: its decoder request was aborted in vLLM within the bound.
        stops = await _metric_until(url, "vita_tts_stop_seconds_count", lambda v: v >= 1)
        assert stops >= 1

        # 3. The new answer is cancelled by the client; then nothing of the voice may still run in vLLM.
        await s.send({"type": "response.cancel"})
        await s.until(lambda e: e["type"] == "response.done" and e["response"]["id"] == second["response"]["id"])
        assert await _metric_until(url, "vita_tts_requests_in_flight", lambda v: v == 0, timeout=5) == 0
        assert await _metric_until(url, "vita_engine_requests_in_flight", lambda v: v == 0, timeout=5) == 0
    finally:
        await ws.close()
    metrics = await asyncio.to_thread(_metrics, url)
    count = metrics["vita_tts_stop_seconds_count"]
    within = metrics['vita_tts_stop_seconds_bucket{le="0.02"}']
    worst = metrics["vita_tts_stop_seconds_sum"]  # every observation is > 0, so the sum bounds the largest
    print(f"speech aborts: {count:.0f}, {worst * 1000 / count:.2f} ms on average (cancel to vLLM abort returned)")
    assert count >= 1 and within == count, (
        f"{count - within:.0f} of {count:.0f} speech aborts took longer than {ABORT_BOUND_S * 1000:.0f} ms "
        f"(sum {worst * 1000:.1f} ms)")


async def test_chat_completion_speaks_in_the_vita_voice(voice_server: ServerProcess) -> None:
    """The HTTP API's spoken reply uses the same engine (each request its own `VitaTTS` session)."""
    body = {"model": "vita", "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"},
            "max_tokens": 3, "messages": [{"role": "user", "content": "Say hello."}]}
    request = urllib.request.Request(voice_server.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={**AUTH, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:  # noqa: ASYNC210 - one request, test only
        reply = json.loads(response.read())
    message = reply["choices"][0]["message"]
    assert message["audio"] is not None, reply
    wav = base64.b64decode(message["audio"]["data"])
    assert wav[:4] == b"RIFF" and len(wav) > 44 + 2 * 2400  # more than 0.1 s at 24 kHz
    assert await _metric_until(voice_server.url, "vita_tts_requests_in_flight", lambda v: v == 0) == 0


def test_tts_vita_without_the_voice_fails_at_startup(served_model: Path, tmp_path: Path) -> None:
    """`tts: vita` on a checkpoint without vita_tts_ckpt/ is refused before any engine starts."""
    result = subprocess.run(
        [sys.executable, "-m", "clients.cli", "serve", "--model", str(served_model), "--device", "cpu",
         "--tts", "vita", "--port", "1"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "tts=vita, but" in result.stderr and "has no vita_tts_ckpt/" in result.stderr
    assert "--tts auto, espeak, http or none" in result.stderr
