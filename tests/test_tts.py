"""TTS backends, audio helpers and the sentence chunker."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from duplex import tts as tts_mod
from duplex.sentences import SentenceChunker, strip_special_tokens
from duplex.tts import (
    ESPEAK_MISSING,
    EspeakTTS,
    EspeakUnavailableError,
    TextOnlyTTS,
    TextToSpeech,
    float_to_pcm16,
    resample,
)

LONG_TEXT = " ".join(f"This is sentence number {i} of a very long answer." for i in range(400))


@pytest.fixture(scope="module")
def espeak() -> EspeakTTS:
    return EspeakTTS()


# --- espeak -------------------------------------------------------------------------------------


def test_espeak_speaks(espeak: EspeakTTS) -> None:
    assert isinstance(espeak, TextToSpeech)
    assert espeak.sample_rate == 22_050
    pcm = espeak.synthesize_blocking("The quick brown fox jumps over the lazy dog.")
    assert pcm.dtype == np.float32
    seconds = pcm.size / espeak.sample_rate
    assert 1.5 < seconds < 5.0  # nine words at 175 wpm is about three seconds
    assert 0.02 < float(np.sqrt(np.mean(pcm**2))) and np.abs(pcm).max() <= 1.0
    assert espeak.synthesize_blocking("   ").size == 0


async def test_espeak_streams_chunks(espeak: EspeakTTS) -> None:
    text = "Hello there. This is streamed speech."
    chunks = [c async for c in espeak.synthesize(text)]
    assert len(chunks) > 3 and all(c.dtype == np.float32 and c.ndim == 1 for c in chunks)
    streamed = np.concatenate(chunks)
    whole = espeak.synthesize_blocking(text)
    # espeak-ng's output length varies by a few samples between runs; content matches
    assert abs(streamed.size - whole.size) < 0.01 * whole.size


async def test_espeak_aclose_stops_promptly(espeak: EspeakTTS) -> None:
    t0 = time.perf_counter()
    espeak.synthesize_blocking(LONG_TEXT[:2000])
    per_char = (time.perf_counter() - t0) / 2000
    full = per_char * len(LONG_TEXT)  # what finishing the whole text would take

    gen = espeak.synthesize(LONG_TEXT)
    received = 0
    t0 = time.perf_counter()
    async for chunk in gen:
        received += chunk.size
        if received > espeak.sample_rate:  # one second of audio in
            break
    await gen.aclose()
    elapsed = time.perf_counter() - t0
    assert elapsed < max(0.5 * full, 0.05)
    assert not espeak._engine.lock.locked()  # the worker has finished, not just been abandoned


@pytest.mark.parametrize("closing", [True, False])
async def test_espeak_task_cancel_stops_promptly(espeak: EspeakTTS, closing: bool) -> None:
    started = asyncio.Event()

    async def speak() -> None:
        gen = espeak.synthesize(LONG_TEXT)
        if closing:  # the recommended way: closes the generator as the task unwinds
            async with contextlib.aclosing(gen):
                async for _ in gen:
                    started.set()
                    await asyncio.sleep(0.01)  # a paced consumer, like real-time playback
        else:  # a bare `async for`: Python closes the generator only when it is collected
            async for _ in gen:
                started.set()
                await asyncio.sleep(0.01)

    task = asyncio.create_task(speak())
    await asyncio.wait_for(started.wait(), 5)
    t0 = time.perf_counter()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    if not closing:
        while espeak._engine.lock.locked() and time.perf_counter() - t0 < 1.0:
            await asyncio.sleep(0.005)  # the loop's async-generator finalizer runs aclose()
    assert time.perf_counter() - t0 < 0.5
    assert not espeak._engine.lock.locked()
    # the engine is immediately usable again
    assert espeak.synthesize_blocking("Still working.").size > 0


async def test_espeak_concurrent_requests_serialize(espeak: EspeakTTS) -> None:
    async def collect(text: str) -> int:
        return sum([c.size async for c in espeak.synthesize(text)])

    sizes = await asyncio.gather(*(collect(f"Request number {i}.") for i in range(4)))
    assert all(s > 0.3 * espeak.sample_rate for s in sizes)


def test_espeak_unknown_voice(espeak: EspeakTTS) -> None:
    with pytest.raises(ValueError, match="voice"):
        EspeakTTS(voice="no-such-voice-xx").synthesize_blocking("hi")


def test_missing_extra_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import now raises ImportError
    with pytest.raises(EspeakUnavailableError) as err:
        tts_mod._espeak_loader()
    assert str(err.value) == ESPEAK_MISSING
    assert "vita-duplex[espeak]" in ESPEAK_MISSING and "text-only" in ESPEAK_MISSING


async def test_text_only_yields_nothing() -> None:
    t = TextOnlyTTS()
    assert isinstance(t, TextToSpeech)
    assert [c async for c in t.synthesize("Hello there.")] == []


# --- audio helpers ------------------------------------------------------------------------------


def test_resample_keeps_pitch_and_duration() -> None:
    sr_in, sr_out = 22_050, 16_000
    t = np.arange(sr_in) / sr_in
    tone = (0.5 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)
    out = resample(tone, sr_in, sr_out)
    assert out.dtype == np.float32 and abs(out.size - sr_out) <= 1
    peak_hz = np.argmax(np.abs(np.fft.rfft(out))) * sr_out / out.size
    assert abs(peak_hz - 440.0) < 2.0
    np.testing.assert_array_equal(resample(tone, sr_in, sr_in), tone)


def test_float_to_pcm16() -> None:
    raw = float_to_pcm16(np.array([0.0, 1.0, -1.0, 2.0, -2.0, 0.5], np.float32))
    assert np.frombuffer(raw, "<i2").tolist() == [0, 32767, -32767, 32767, -32767, 16384]


# --- sentence chunker ---------------------------------------------------------------------------


def chunk_stream(deltas: list[str], **kw: int) -> list[str]:
    c = SentenceChunker(**kw)
    out: list[str] = []
    for d in deltas:
        out += c.push(d)
    return out + c.flush()


def test_first_chunk_cuts_at_a_comma_once_it_has_words() -> None:
    deltas = ["Well", ",", " I think", " that", ",", " in general", ", this works", ". And", " so, on."]
    assert chunk_stream(deltas) == ["Well, I think that,", "in general, this works.", "And so, on."]
    c = SentenceChunker()
    assert c.push("Sure, here is") == []  # one word before the comma: too short to cut
    assert c.push(" the plan: first") == ["Sure, here is the plan:"]


def test_sentence_ends() -> None:
    text = "Is it ready? Yes! It is.\nNext line 你好。再见！"
    assert chunk_stream([text]) == ["Is it ready?", "Yes!", "It is.", "Next line 你好。", "再见！"]


def test_no_cut_in_numbers_or_abbreviations() -> None:
    text = (
        "Pi is 3.14 and e is 2.72, roughly. Mr. Smith and Dr. Jones met e.g. at noon. "
        "It cost 1,000 dollars at 3:45 today. J. K. Rowling wrote it... and then? Done."
    )
    assert chunk_stream([text], first_chunk_min_words=100) == [
        "Pi is 3.14 and e is 2.72, roughly.",
        "Mr. Smith and Dr. Jones met e.g. at noon.",
        "It cost 1,000 dollars at 3:45 today.",
        "J. K. Rowling wrote it... and then?",
        "Done.",
    ]


def test_waits_for_the_next_word_after_a_period() -> None:
    c = SentenceChunker()
    assert c.push("Call Mr.") == []
    assert c.push(" ") == []
    assert c.push("Smith now. Then") == ["Call Mr. Smith now."]
    assert c.flush() == ["Then"]
    assert c.flush() == []


def test_state_and_special_tokens_are_not_spoken() -> None:
    deltas = ["☞", "Hello", " there<", "|im", "_end|>", ". <2>Bye", " now☟.", "</", "s>", "<|endoftext|>"]
    assert chunk_stream(deltas) == ["Hello there.", "Bye now."]
    assert strip_special_tokens("<1>a☜b<3>c<|im_start|>") == "abc"
    assert chunk_stream(["1 < 2 and 3 > 2."]) == ["1 < 2 and 3 > 2."]
    assert chunk_stream(["☞", "<|im_end|>"]) == []


def test_flush_returns_the_rest_and_resets() -> None:
    c = SentenceChunker()
    assert c.push("An unfinished thought") == []
    assert c.flush() == ["An unfinished thought"]
    assert c.push("Again, a first chunk") == []  # after flush the next chunk is "first" again
    assert c.push(" here, ok") == ["Again, a first chunk here,"]


def test_overlong_run_on_is_cut() -> None:
    text = "word " * 100
    chunks = chunk_stream([text], max_chunk_chars=60)
    assert all(len(c) <= 60 for c in chunks) and " ".join(chunks).split() == text.split()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=12), min_size=1, max_size=40))
def test_any_split_gives_the_same_chunks(cuts: list[int]) -> None:
    text = (
        "☞Hi, Dr. Who<|im_end|> is here. It costs 3.50, e.g. about 4! Okay: go on\nNext… "
        "and more, more words; 你好，我们走吧。End</s>"
    )
    deltas, pos = [], 0
    for n in cuts:
        deltas.append(text[pos : pos + n])
        pos += n
    deltas.append(text[pos:])
    assert chunk_stream(deltas) == chunk_stream([text])


def test_control_characters_do_not_cut_speech_short() -> None:
    from duplex.tts import EspeakTTS, speakable

    assert speakable("a\x00b\x07c\nd") == "abc\nd"
    tts = EspeakTTS()
    whole = tts.synthesize_blocking("hello there my friend")
    with_nul = tts.synthesize_blocking("\x00hello there my friend")
    assert len(with_nul) > 0.8 * len(whole)
