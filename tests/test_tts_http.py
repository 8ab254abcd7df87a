"""The OpenAI-compatible TTS backend against a real HTTP server (uvicorn) that speaks with espeak."""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from duplex.tts import EspeakTTS, float_to_pcm16, resample
from duplex.tts_http import OpenAISpeechTTS, TTSServerError


def _speech_server() -> FastAPI:
    app = FastAPI()
    voice = EspeakTTS()

    @app.post("/v1/audio/speech")
    async def speech(request: Request):  # type: ignore[no-untyped-def]
        body = await request.json()
        if body.get("response_format") != "pcm" or not body.get("input"):
            return JSONResponse({"error": {"message": "bad request"}}, status_code=400)
        pcm = resample(voice.synthesize_blocking(body["input"]), voice.sample_rate, 24000)
        data = float_to_pcm16(pcm)
        return StreamingResponse(iter([data[i : i + 1001] for i in range(0, len(data), 1001)]))  # odd splits

    return app


@pytest.fixture
async def speech_url():  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_speech_server(), port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1"
    server.should_exit = True
    await task


async def test_streams_pcm_from_an_openai_compatible_server(speech_url: str) -> None:
    tts = OpenAISpeechTTS(speech_url, voice="alloy")
    chunks = [c async for c in tts.synthesize("Hello from the speech server.")]
    audio = np.concatenate(chunks)
    assert tts.sample_rate == 24000
    assert len(chunks) > 1 and 0.5 < len(audio) / 24000 < 5
    assert np.abs(audio).max() > 0.05


async def test_server_errors_are_reported(speech_url: str) -> None:
    tts = OpenAISpeechTTS(speech_url.replace("/v1", "/nope/v1"))
    with pytest.raises(TTSServerError, match="404"):
        _ = [c async for c in tts.synthesize("hi")]
