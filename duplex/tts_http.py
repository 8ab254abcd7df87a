"""Speech from an OpenAI-compatible `/v1/audio/speech` server (e.g. a neural TTS beside the GPU).

Asks for `response_format: "pcm"` (raw 24 kHz 16-bit mono, as OpenAI defines it) and streams the
body, so the first audio plays before the whole sentence is synthesized.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import numpy as np

PCM_RATE = 24000  # OpenAI's "pcm" response format


class TTSServerError(RuntimeError):
    pass


class OpenAISpeechTTS:
    def __init__(
        self,
        base_url: str,
        *,
        model: str = "tts-1",
        voice: str = "alloy",
        api_key: str | None = None,
        timeout_s: float = 30.0,
        chunk_bytes: int = 4800,  # 100 ms
    ) -> None:
        self._url = base_url.rstrip("/") + ("/audio/speech" if base_url.rstrip("/").endswith("/v1") else "/v1/audio/speech")
        self._model, self._voice = model, voice
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout_s
        self._chunk = chunk_bytes

    @property
    def sample_rate(self) -> int:
        return PCM_RATE

    async def synthesize(self, text: str, *, first: bool | None = None) -> AsyncIterator[np.ndarray]:
        if not text.strip():
            return
        body = {"model": self._model, "voice": self._voice, "input": text, "response_format": "pcm"}
        async with (
            httpx.AsyncClient(timeout=self._timeout) as client,
            client.stream("POST", self._url, json=body, headers=self._headers) as response,
        ):
            if response.status_code != 200:
                detail = (await response.aread())[:200].decode(errors="replace")
                raise TTSServerError(f"TTS server {self._url} answered {response.status_code}: {detail}")
            leftover = b""
            async for data in response.aiter_bytes(self._chunk):
                data = leftover + data
                even = len(data) - len(data) % 2  # a chunk may split a sample
                leftover = data[even:]
                if even:
                    yield np.frombuffer(data[:even], dtype="<i2").astype(np.float32) / 32768.0
