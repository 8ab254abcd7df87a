"""The vita voice: VITA-1.5's own speech decoder as a `TextToSpeech` backend.

One `VitaVoice` per server holds the voice engine (`models.vita_tts.engine.VoiceEngine`: NAR in torch, the AR
decoder in one vLLM engine shared by every session, TiCodec in torch) and the text embedder (tokenizer + the
LLM's input-embedding rows). `voice.session()` gives each session its own `VitaTTS`, which the sentence pipeline
uses like any other backend: `synthesize(sentence)` streams float32 pieces at 24 kHz.

Barge-in: the runtime stops iterating (`aclose()` through `contextlib.aclosing`, or cancels its task). The
generator's cleanup leaves the vLLM stream and calls `AsyncLLM.abort(request_id)` at once, so the decoder stops
at its next step and its KV cache is freed; nothing keeps running for a sentence nobody will hear.

Text is prepared as upstream's web demo does (`models.vita_tts.engine.prepare_text`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from models.vita_tts.config import find_tts_dir
from models.vita_tts.engine import SpeechStats, TextEmbedder, VoiceEngine, VoiceSettings, prepare_text
from models.vita_tts.streaming import FIRST_SENTENCE, LATER_SENTENCE

log = logging.getLogger(__name__)


def has_vita_voice(model_dir: str | Path) -> bool:
    """True when the checkpoint ships its speech decoder (`vita_tts_ckpt/`): `tts: auto` then picks `vita`."""
    return find_tts_dir(model_dir) is not None


class VitaVoice:
    """The shared part: one voice engine and one text embedder for all sessions."""

    def __init__(self, engine: VoiceEngine, embedder: TextEmbedder) -> None:
        self.engine = engine
        self.embedder = embedder

    @classmethod
    async def start(
        cls, model_dir: str | Path, settings: VoiceSettings | None = None, tokenizer: Any = None
    ) -> VitaVoice:
        """`model_dir`: the VITA-1.5 checkpoint (its `vita_tts_ckpt/` and embedding table are read);
        `tokenizer`: the LLM engine's (None: loaded from `model_dir`)."""
        tts_dir = find_tts_dir(model_dir)
        if tts_dir is None:
            raise FileNotFoundError(
                f"{model_dir}: no vita_tts_ckpt/ (decoder/ and codec/ with model.json + final.pt)"
            )
        settings = (
            replace(settings, tts_dir=str(tts_dir)) if settings else VoiceSettings(tts_dir=str(tts_dir))
        )
        engine = await VoiceEngine.start(settings)
        try:
            embedder = await asyncio.to_thread(TextEmbedder, model_dir, engine.ckpt.decoder.idim, tokenizer)
        except BaseException:
            await engine.shutdown()
            raise
        return cls(engine, embedder)

    def session(self) -> VitaTTS:
        return VitaTTS(self)

    async def shutdown(self) -> None:
        await self.engine.shutdown()


class VitaTTS:
    """Per session. `synthesize(text, first=...)`: `first` marks a response's first sentence (shorter chunks,
    a looser cut threshold and leading-silence trim, as upstream); when not given, the first call and the first
    call after an interrupted one count as first."""

    def __init__(self, voice: VitaVoice, max_tokens: int | None = None) -> None:
        self.voice = voice
        self.max_tokens = max_tokens  # codec tokens per sentence; None: the engine's (upstream: 1000 = 25 s)
        self._next_is_first = True
        self.last_stats: SpeechStats | None = None

    @property
    def sample_rate(self) -> int:
        return self.voice.engine.sample_rate

    def new_response(self) -> None:
        self._next_is_first = True

    async def synthesize(self, text: str, *, first: bool | None = None) -> AsyncIterator[np.ndarray]:
        is_first = self._next_is_first if first is None else first
        self._next_is_first = False
        text = prepare_text(text, is_first)
        if not text:
            return
        vectors = await asyncio.to_thread(self.voice.embedder.vectors, text)
        if vectors.shape[0] == 0:
            return
        request_id = f"tts-{uuid.uuid4().hex}"
        stats = SpeechStats()
        self.last_stats = stats
        completed = False
        params = FIRST_SENTENCE if is_first else LATER_SENTENCE
        try:
            async with contextlib.aclosing(
                self.voice.engine.speak(vectors, request_id, params, self.max_tokens, stats=stats)
            ) as pieces:
                async for pcm in pieces:
                    yield pcm
            completed = True
        finally:
            if not completed:
                self._next_is_first = True  # interrupted (barge-in): the next sentence starts a new response
