"""Echo guard: the assistant's own voice coming back through the microphone is not a barge-in.

The assistant's reply is espeak speech at 24 kHz, noted with the guard in 100 ms chunks as the runtime
emits it. The simulated microphone hears it resampled to 16 kHz, filtered (loudspeaker/room FIR, an
optional early reflection), delayed, attenuated, plus noise; the user is a different espeak voice.
"""

from __future__ import annotations

import time
from functools import cache

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from duplex.echo import EchoGate, EchoGateParams, EchoGuard, EchoGuardParams, _gram
from duplex.events import SpeechDiscarded, SpeechEnded, SpeechStarted
from duplex.tts import EspeakTTS, resample
from duplex.vad import SileroModel, VadSpeechDiscard, VadSpeechEnd, VadSpeechStart, VadStream
from tests.speech import espeak_speech, speech_span

MIC = 16_000
OUT = 24_000
MS = MIC // 1000
PLAY = MIC  # the reply starts playing at microphone sample 16000 (1 s)
WINDOW = 400 * MS
CHUNK = 2400  # output samples per noted chunk (100 ms)

REPLY = (
    "Sure. The weather today will be mostly sunny, with a high of twenty two degrees "
    "and a light breeze from the west in the afternoon."
)
QUESTION = "Stop, what time is it?"

FILTERS = {
    "lowpass": np.array([1.0, 0.6, 0.3, 0.15]) / 2.05,
    "decay": 0.7 ** np.arange(12) / np.sum(0.7 ** np.arange(12)),
    "tilt": np.array([1.0, -0.4]),
    "flat": np.array([1.0]),
}


@cache
def reply24() -> np.ndarray:
    """The assistant's reply as the runtime sends it: 24 kHz float32."""
    return espeak_speech(REPLY, OUT)


@cache
def question16() -> np.ndarray:
    """The user: another voice, slower, at the microphone's rate."""
    tts = EspeakTTS(voice="en-us+f3", rate_wpm=140)
    return resample(tts.synthesize_blocking(QUESTION), tts.sample_rate, MIC)


@cache
def reply_at_mic() -> np.ndarray:
    return resample(reply24(), OUT, MIC)  # what the loudspeaker plays, as the 16 kHz microphone samples it


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


def noted_guard(params: EchoGuardParams | None = None, play: int = PLAY) -> EchoGuard:
    """A guard that saw the reply emitted in 100 ms chunks, playing from microphone sample ``play``."""
    guard = EchoGuard(params)
    pcm = reply24()
    for k in range(0, pcm.size, CHUNK):
        guard.note_output(pcm[k : k + CHUNK], play + k * MIC / OUT)
    return guard


def echo_path(
    delay_ms: float,
    gain: float,
    filt: str = "lowpass",
    reflection: bool = True,
    noise_rms: float = 0.001,
    seed: int = 0,
    extra_s: float = 1.0,
) -> np.ndarray:
    """The microphone: the reply played from PLAY, back ``delay_ms`` later through the room."""
    e = np.convolve(reply_at_mic(), FILTERS[filt])[: reply_at_mic().size]
    if reflection:  # an early reflection 7 ms later, -12 dB: outside the 2 ms FIR the guard fits
        k = 7 * MS
        e = e + np.concatenate((np.zeros(k), 0.25 * e[:-k]))
    total = PLAY + e.size + round(extra_s * MIC) + 500 * MS
    mic = np.zeros(total, np.float32)
    start = PLAY + round(delay_ms * MS)
    mic[start : start + e.size] += (gain * e).astype(np.float32)
    rng = np.random.default_rng(seed)
    mic += (rng.standard_normal(total) * noise_rms).astype(np.float32)
    return mic


def echo_span(delay_ms: float) -> tuple[int, int]:
    """Microphone samples where the echo of the reply's speech is."""
    span = speech_span(reply_at_mic())
    assert span is not None
    start = PLAY + round(delay_ms * MS)
    return start + span[0], start + span[1]


def add_user(mic: np.ndarray, at: int, level: float) -> int:
    """Mix the question into ``mic`` from sample ``at`` scaled by ``level``; returns its speech onset."""
    q = question16()
    mic[at : at + q.size] += (level * q).astype(np.float32)
    span = speech_span(q)
    assert span is not None
    return at + span[0]


def window_ends(delay_ms: float, step_ms: int = 200) -> list[int]:
    lo, hi = echo_span(delay_ms)
    return list(range(lo + WINDOW, hi, step_ms * MS))


# --- the check ------------------------------------------------------------------------------------


@pytest.mark.parametrize("delay_ms", [0, 80, 250, 450])
@pytest.mark.parametrize("gain", [0.1, 0.3, 0.8])
def test_echo_of_the_reply_is_echo(delay_ms: int, gain: float) -> None:
    guard = noted_guard()
    mic = echo_path(delay_ms, gain, seed=delay_ms)
    checks = [guard.check(mic[end - WINDOW : end], end) for end in window_ends(delay_ms)]
    assert len(checks) >= 25
    assert all(c.verdict in ("echo", "silence") for c in checks), [(c.verdict, c.ratio) for c in checks]
    fitted = [c for c in checks if c.is_echo]
    assert len(fitted) >= 0.8 * len(checks)
    # The delay is found to within the FIR (the peak sits in the filter's body, a few samples early).
    true = delay_ms * MS
    assert all(-guard.params.taps <= c.delay - true <= guard.params.tap_lead for c in fitted)
    assert np.median([c.gain for c in fitted]) == pytest.approx(gain, rel=0.35)


@pytest.mark.parametrize("filt", sorted(FILTERS))
def test_echo_through_other_filters(filt: str) -> None:
    guard = noted_guard()
    mic = echo_path(200, 0.5, filt=filt, reflection=False, noise_rms=0.002)
    checks = [guard.check(mic[end - WINDOW : end], end) for end in window_ends(200, step_ms=300)]
    assert all(c.verdict in ("echo", "silence") for c in checks)
    assert max(c.ratio for c in checks if c.is_echo) < 0.2


def room_response(rt60_s: float, drr_db: float, seed: int = 0) -> np.ndarray:
    """A direct path plus an exponentially decaying noise tail, ``drr_db`` below it in energy."""
    n = round(rt60_s * MIC)
    t = np.arange(n) / MIC
    tail = np.random.default_rng(seed).standard_normal(n) * np.exp(-6.9 * t / rt60_s)
    tail[:MS] = 0.0
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail**2))
    tail[0] += 1.0
    return tail


@pytest.mark.parametrize(
    ("rt60_s", "drr_db", "share"), [(0.3, 10.0, 1.0), (0.6, 10.0, 0.85), (0.3, 6.0, 0.85)]
)
def test_reverberant_echo_is_echo(rt60_s: float, drr_db: float, share: float) -> None:
    """The room's tail is not in the 2 ms FIR; the reverb budget takes it for the echo's own."""
    guard = noted_guard()
    e = np.convolve(reply_at_mic(), room_response(rt60_s, drr_db))[: reply_at_mic().size]
    mic = np.zeros(PLAY + e.size + MIC, np.float32)
    mic[PLAY + 100 * MS : PLAY + 100 * MS + e.size] += (0.5 * e).astype(np.float32)
    mic += np.random.default_rng(10).standard_normal(mic.size).astype(np.float32) * 0.001
    verdicts = [guard.check(mic[end - WINDOW : end], end).verdict for end in window_ends(100, step_ms=100)]
    assert verdicts.count("echo") >= share * len(verdicts)


@pytest.mark.parametrize("delay_ms", [80, 450])
@pytest.mark.parametrize(("gain", "level_db"), [(0.3, 0.0), (0.8, 0.0), (0.8, 6.0), (0.1, 10.0)])
def test_question_over_the_echo_is_speech(delay_ms: int, gain: float, level_db: float) -> None:
    """The user speaks over the echo at the echo's level or louder: not echo."""
    guard = noted_guard()
    mic = echo_path(delay_ms, gain, seed=1)
    lo, _ = echo_span(delay_ms)
    echo_rms = rms(mic[lo : lo + 2 * MIC])
    q = question16()
    level = echo_rms * 10 ** (level_db / 20) / rms(q[slice(*speech_span(q))])
    onset = add_user(mic, lo + 2 * MIC, level)
    # Windows ending in "Stop" and in "what time is it" (the comma pause between them is left out).
    for end in (onset + 250 * MS, onset + 400 * MS, onset + 1200 * MS, onset + 1500 * MS):
        check = guard.check(mic[end - WINDOW : end], end)
        assert check.verdict == "speech", (end - onset, check)
        assert check.unexplained >= guard.params.speech_frames
        assert check.speech_sample is not None and check.speech_sample >= onset - 3 * 512


def test_user_alone_while_output_plays_is_speech() -> None:
    """A perfect client AEC: output is playing but the microphone hears only the user."""
    guard = noted_guard()
    mic = np.zeros(PLAY + 4 * MIC, np.float32)
    onset = add_user(mic, PLAY + MIC, 0.8)
    mic += np.random.default_rng(2).standard_normal(mic.size).astype(np.float32) * 0.001
    for end in range(onset + 200 * MS, onset + 1500 * MS, 100 * MS):
        check = guard.check(mic[end - WINDOW : end], end)
        assert check.verdict == "speech", check
        assert check.ratio > 0.7


def test_nothing_playing_and_silence_are_not_echo() -> None:
    guard = EchoGuard()
    mic = np.zeros(3 * MIC, np.float32)
    onset = add_user(mic, MIC // 2, 0.8)
    end = onset + WINDOW
    assert guard.check(mic[end - WINDOW : end], end).verdict == "no_output"
    assert not guard.is_echo(mic[end - WINDOW : end], end)
    guard = noted_guard()
    quiet = np.random.default_rng(3).standard_normal(WINDOW).astype(np.float32) * 0.0005
    end = PLAY + 2 * MIC
    check = guard.check(quiet, end)
    assert check.verdict == "silence" and not check.is_echo
    assert guard.check(np.zeros(0, np.float32), end).verdict == "silence"
    off = EchoGuard(EchoGuardParams(enabled=False))
    assert off.check(mic[end - WINDOW : end], end).verdict == "disabled"


def test_output_after_the_window_is_no_output() -> None:
    """Output scheduled later than the window (less the minimum delay) cannot echo into it."""
    guard = noted_guard(play=5 * MIC)
    mic = echo_path(100, 0.5)  # an echo of output the guard places 4 s later
    end = echo_span(100)[0] + WINDOW
    assert guard.check(mic[end - WINDOW : end], end).verdict == "no_output"
    assert not guard.playing_during(end - WINDOW, end)
    assert guard.playing_during(5 * MIC, 5 * MIC + WINDOW)


def test_residual_removes_the_echo_and_keeps_the_user() -> None:
    guard = noted_guard()
    mic = echo_path(250, 0.8, reflection=False, seed=4)
    clean = np.zeros_like(mic)
    lo, _ = echo_span(250)
    onset = add_user(clean, lo + MIC, 0.5)
    mix = mic + clean
    end = onset + 1500 * MS
    n = 1500 * MS
    user = clean[end - n : end]
    resid = guard.residual(mix[end - n : end], end)
    before = 10 * np.log10(np.sum(user**2) / np.sum((mix[end - n : end] - user) ** 2))
    after = 10 * np.log10(np.sum(user**2) / np.sum((resid - user) ** 2))
    assert before < 3 and after > before + 15, (before, after)


def test_check_costs_well_under_5_ms() -> None:
    """One check: a 400 ms window, a 0-500 ms delay search, a 32-tap fit per candidate delay."""
    guard = noted_guard()
    echo = echo_path(300, 0.5, seed=5)
    over = echo.copy()
    lo, _ = echo_span(300)
    onset = add_user(over, lo + MIC, 0.6)
    cases = {
        "echo": (echo, window_ends(300, step_ms=100)[:40]),
        "user over echo": (over, list(range(onset + 300 * MS, onset + 1500 * MS, 30 * MS))),
    }
    for name, (mic, ends) in cases.items():
        for end in ends[:5]:
            guard.check(mic[end - WINDOW : end], end)
        wall, cpu = [], []
        for end in ends:
            w0, c0 = time.perf_counter(), time.process_time()
            guard.check(mic[end - WINDOW : end], end)
            wall.append(time.perf_counter() - w0)
            cpu.append(time.process_time() - c0)
        med_wall, med_cpu = 1000 * float(np.median(wall)), 1000 * float(np.median(cpu))
        print(f"\necho check, {name} (400 ms window, 0-500 ms delays): median {med_wall:.2f} ms wall, "
              f"{med_cpu:.2f} ms CPU, max {1000 * max(cpu):.2f} ms CPU over {len(ends)} checks")  # fmt: skip
        assert med_cpu < 5.0


# --- random echo paths ----------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    delay_ms=st.floats(0, 500),
    gain=st.floats(0.05, 1.0),
    filt=st.sampled_from(sorted(FILTERS)),
    reflection=st.booleans(),
    noise=st.floats(0.0, 0.002),
    at=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_any_echo_path_in_range_is_echo(
    delay_ms: float, gain: float, filt: str, reflection: bool, noise: float, at: float, seed: int
) -> None:
    guard = noted_guard()
    mic = echo_path(delay_ms, gain, filt, reflection, noise, seed)
    lo, hi = echo_span(delay_ms)
    end = lo + WINDOW + round(at * (hi - lo - WINDOW))
    check = guard.check(mic[end - WINDOW : end], end)
    assert check.verdict in ("echo", "silence"), check


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    delay_ms=st.floats(0, 500),
    gain=st.floats(0.05, 1.0),
    level_db=st.floats(0.0, 12.0),
    filt=st.sampled_from(sorted(FILTERS)),
    at=st.floats(0.0, 3.0),
    into_ms=st.sampled_from([300, 400, 1200, 1500]),
    seed=st.integers(0, 2**16),
)
def test_question_over_any_echo_is_speech(
    delay_ms: float, gain: float, level_db: float, filt: str, at: float, into_ms: int, seed: int
) -> None:
    guard = noted_guard()
    mic = echo_path(delay_ms, gain, filt, True, 0.001, seed)
    lo, _ = echo_span(delay_ms)
    start = lo + round(at * MIC)
    q = question16()
    level = (
        max(rms(mic[start : start + q.size]), 0.01) * 10 ** (level_db / 20) / rms(q[slice(*speech_span(q))])
    )
    onset = add_user(mic, start, level)
    end = onset + into_ms * MS
    check = guard.check(mic[end - WINDOW : end], end)
    assert check.verdict == "speech", check


# --- output bookkeeping ---------------------------------------------------------------------------


def test_reference_is_the_same_however_the_output_was_chunked() -> None:
    pcm = reply24()[: 2 * OUT]
    whole = EchoGuard()
    whole.note_output(pcm, 1000.5)
    chunked = EchoGuard()
    rng = np.random.default_rng(6)
    k = 0
    while k < pcm.size:
        n = int(rng.integers(1, 3000))
        chunked.note_output(pcm[k : k + n], 1000.5 + k * MIC / OUT)
        k += n
    a, b = whole.reference(900, 900 + MIC), chunked.reference(900, 900 + MIC)
    np.testing.assert_array_equal(a, b)  # chunks continue each other exactly on the output grid
    # on the microphone grid, the reference is the output resampled as the microphone hears it
    aligned = EchoGuard()
    aligned.note_output(pcm, 1000)
    direct = resample(pcm, OUT, MIC)
    assert np.max(np.abs(aligned.reference(1000, 1000 + MIC)[200:-200] - direct[200 : MIC - 200])) < 0.01


def test_a_rewind_replaces_the_scheduled_output_and_discard_forgets_it() -> None:
    guard = EchoGuard()
    ones = np.full(OUT, 0.5, np.float32)  # 1 s of output
    guard.note_output(ones, 0.0)
    assert guard.output_end() == pytest.approx(MIC)
    guard.note_output(-ones[: OUT // 2], 4000.0)  # re-sent from 0.25 s: everything after is replaced
    ref = guard.reference(0, 2 * MIC)
    assert ref[1000:3900].mean() == pytest.approx(0.5, abs=0.01)
    assert ref[4100:11900].mean() == pytest.approx(-0.5, abs=0.01)
    assert np.abs(ref[12100:]).max() < 0.01
    guard.discard_from(8000.0)  # the client dropped what it buffered after 0.5 s
    assert guard.output_end() == pytest.approx(8000.0, abs=1)
    assert np.abs(guard.reference(8100, 2 * MIC)).max() < 0.01
    guard.clear()
    assert guard.output_end() == 0.0 and not guard.playing_during(0, 2 * MIC)


def test_old_output_is_forgotten_but_output_sent_ahead_is_kept() -> None:
    guard = EchoGuard(EchoGuardParams(history_s=2.0))
    gate = EchoGate(guard)
    for second in range(30):  # TTS is fast: 30 s of reply sent at once, to play from 1 s on
        guard.note_output(np.full(OUT, 0.1, np.float32), (1 + second) * MIC)
    push_all(gate, np.zeros(9 * MIC, np.float32), 9 * MIC)  # 9 s of microphone audio later
    assert np.abs(guard.reference(0, 6 * MIC - 160)).max() < 1e-6  # ended more than 2 s ago
    assert guard.reference(6 * MIC, 31 * MIC)[100:-100].mean() == pytest.approx(0.1, abs=0.01)


def test_same_rate_output_needs_no_resampling() -> None:
    guard = EchoGuard(EchoGuardParams(output_rate=MIC))
    x = np.arange(100, dtype=np.float32)
    guard.note_output(x, 50)
    np.testing.assert_array_equal(guard.reference(40, 160), np.concatenate((np.zeros(10), x, np.zeros(10))))


@pytest.mark.parametrize(("n", "k"), [(100, 1), (100, 2), (6400, 32), (50, 8), (333, 17)])
def test_gram_matrix_is_exact(n: int, k: int) -> None:
    seg = np.random.default_rng(n + k).standard_normal(n + k - 1)
    rows = np.stack([seg[t : t + n] for t in range(k)])
    np.testing.assert_allclose(_gram(seg, n, k), rows @ rows.T, rtol=1e-9, atol=1e-9)


def test_params_are_validated() -> None:
    with pytest.raises(ValueError):
        EchoGuardParams(min_delay_ms=600, max_delay_ms=500)
    with pytest.raises(ValueError):
        EchoGuardParams(taps=4, tap_lead=4)
    with pytest.raises(ValueError):
        EchoGuardParams(echo_ratio=1.0)
    with pytest.raises(ValueError):
        EchoGateParams(ring_ms=100)
    with pytest.raises(ValueError):
        EchoGateParams(promote_after=0)


# --- the gate, with fake VAD events ---------------------------------------------------------------


def push_all(gate: EchoGate, mic: np.ndarray, upto: int) -> list:
    out = []
    while gate.mic_end < upto:
        out += gate.push_mic(mic[gate.mic_end : min(gate.mic_end + 320, upto)])
    return out


def test_gate_passes_segments_at_once_when_nothing_plays() -> None:
    gate = EchoGate(EchoGuard())
    mic = np.zeros(2 * MIC, np.float32)
    push_all(gate, mic, MIC)
    assert gate.on_vad(VadSpeechStart(2000, 7000), base=1000) == [SpeechStarted(3000)]
    ended = gate.on_vad(VadSpeechEnd(2000, 12000, np.ones(10000, np.float32)), base=1000)
    assert [(type(e), e.start_sample, e.end_sample) for e in ended] == [(SpeechEnded, 3000, 13000)]
    gate.on_vad(VadSpeechStart(20000, 22000))
    assert gate.on_vad(VadSpeechDiscard(20000, 23000)) == [SpeechDiscarded(20000, 23000)]


def test_gate_drops_an_echo_segment_and_its_end() -> None:
    guard = noted_guard()
    gate = EchoGate(guard)
    mic = echo_path(120, 0.5)
    lo, hi = echo_span(120)
    push_all(gate, mic, lo + 512)
    assert gate.on_vad(VadSpeechStart(lo - 300 * MS, lo)) == []  # held: output is playing
    assert gate.state == "pending"
    assert push_all(gate, mic, lo + 200 * MS + 1) == [] and gate.state == "echo"
    assert push_all(gate, mic, hi) == []  # rechecked all along: never promoted
    assert gate.on_vad(VadSpeechEnd(lo - 300 * MS, hi, mic[lo - 300 * MS : hi])) == []
    assert gate.stats.echo == 1 and gate.stats.promoted == 0 and gate.stats.checks > 20
    # a short echo blip that the VAD discards was never announced, so nothing is taken back
    gate.on_vad(VadSpeechStart(hi, hi))
    assert gate.on_vad(VadSpeechDiscard(hi, hi + 100)) == []


def test_gate_decides_a_segment_that_ends_before_the_deadline() -> None:
    guard = noted_guard()
    gate = EchoGate(guard, EchoGateParams(decision_ms=1000, ring_ms=3000))
    mic = np.zeros(PLAY + 4 * MIC, np.float32)
    onset = add_user(mic, PLAY + MIC, 0.8)
    end = onset + 600 * MS
    push_all(gate, mic, end + 512)
    assert gate.on_vad(VadSpeechStart(onset - 300 * MS, onset)) == []
    out = gate.on_vad(VadSpeechEnd(onset - 300 * MS, end, mic[onset - 300 * MS : end]))
    assert [type(e) for e in out] == [SpeechStarted, SpeechEnded]


def test_disabled_guard_passes_everything_unchanged() -> None:
    guard = noted_guard(EchoGuardParams(enabled=False))
    gate = EchoGate(guard)
    mic = echo_path(120, 0.5)
    lo, hi = echo_span(120)
    push_all(gate, mic, lo + 512)
    assert gate.on_vad(VadSpeechStart(lo - 100, lo)) == [SpeechStarted(lo - 100)]
    assert len(gate.on_vad(VadSpeechEnd(lo - 100, hi, mic[lo - 100 : hi]))) == 1


# --- the gate behind the real VAD -----------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> SileroModel:
    return SileroModel()


def run_session(model: SileroModel, mic: np.ndarray, guard: EchoGuard | None) -> tuple[list, list, list]:
    """Stream ``mic`` in 20 ms chunks through the gate and silero as the runtime would.

    Returns the raw VAD events, the gate's events, and the microphone sample at which each gate
    event came out."""
    gate = EchoGate(guard or EchoGuard())
    vad = VadStream()
    raw: list = []
    out: list = []
    when: list[int] = []

    def emit(events: list) -> None:
        out.extend(events)
        when.extend([gate.mic_end] * len(events))

    for k in range(0, mic.size, 320):
        chunk = mic[k : k + 320]
        emit(gate.push_mic(chunk))
        vad.push(chunk)
        for event in vad.process(model):
            raw.append(event)
            emit(gate.on_vad(event))
    for event in vad.flush():
        raw.append(event)
        emit(gate.on_vad(event))
    return raw, out, when


@pytest.mark.parametrize(("delay_ms", "gain"), [(0, 0.3), (80, 0.8), (250, 0.5), (450, 1.0), (200, 0.1)])
def test_vad_hears_the_echo_but_the_gate_drops_it(model: SileroModel, delay_ms: int, gain: float) -> None:
    raw, out, _ = run_session(model, echo_path(delay_ms, gain, seed=7), noted_guard())
    assert any(isinstance(e, VadSpeechStart) for e in raw)  # without the guard this is a barge-in
    assert out == []


@pytest.mark.parametrize(("delay_ms", "gain", "level_db"), [(80, 0.5, 0.0), (250, 0.8, 3.0), (450, 0.3, 6.0)])
def test_question_over_the_echo_is_promoted(
    model: SileroModel, delay_ms: int, gain: float, level_db: float
) -> None:
    """The echo keeps the VAD in one long segment; the user's question inside it still starts a turn."""
    mic = echo_path(delay_ms, gain, seed=8)
    lo, _ = echo_span(delay_ms)
    level = rms(mic[lo : lo + 2 * MIC]) * 10 ** (level_db / 20) / rms(question16())
    onset = add_user(mic, lo + 2 * MIC, level)
    raw, out, when = run_session(model, mic, noted_guard())
    assert sum(isinstance(e, VadSpeechStart) for e in raw) == 1  # no new onset for the question
    assert [type(e) for e in out] == [SpeechStarted, SpeechEnded]
    started, ended = out
    assert onset - 400 * MS <= started.sample <= onset
    latency_ms = (when[0] - onset) / MS
    print(f"\npromoted {latency_ms:.0f} ms after the question's onset")
    assert latency_ms < 600
    # the segment's audio has the echo taken out: it is mostly the question
    q = question16()
    user = np.zeros(ended.end_sample - ended.start_sample, np.float32)
    a = onset - speech_span(q)[0]
    lo_u, hi_u = max(a, ended.start_sample), min(a + q.size, ended.end_sample)
    user[lo_u - ended.start_sample : hi_u - ended.start_sample] = level * q[lo_u - a : hi_u - a]
    mixed = mic[ended.start_sample : ended.end_sample]
    audio = np.asarray(ended.audio)
    assert np.sum((audio - user) ** 2) < 0.2 * np.sum((mixed - user) ** 2)


def test_question_without_echo_while_playing_passes_after_the_decision(model: SileroModel) -> None:
    mic = np.zeros(PLAY + 5 * MIC, np.float32)
    add_user(mic, PLAY + MIC, 0.8)
    mic += np.random.default_rng(9).standard_normal(mic.size).astype(np.float32) * 0.001
    raw, out, when = run_session(model, mic, noted_guard())
    assert [type(e) for e in out] == [SpeechStarted, SpeechEnded]
    assert out[0].sample == raw[0].start_sample
    held = (when[0] - raw[0].onset_sample) / MS
    assert 200 <= held < 260  # decision_ms after the onset (+ one VAD window)


def test_question_with_nothing_playing_passes_at_once(model: SileroModel) -> None:
    mic = np.zeros(4 * MIC, np.float32)
    add_user(mic, MIC, 0.8)
    raw, out, when = run_session(model, mic, None)
    assert [type(e) for e in out] == [SpeechStarted, SpeechEnded]
    assert out[0].sample == raw[0].start_sample
    assert when[0] - raw[0].onset_sample <= 512 + 320  # the window that fired, plus one chunk


def test_gate_ring_keeps_the_newest_audio_in_any_chunking() -> None:
    gate = EchoGate(EchoGuard(), EchoGateParams(ring_ms=1000))
    x = np.arange(40_000, dtype=np.float32)
    rng = np.random.default_rng(11)
    k = 0
    while k < x.size:
        n = int(rng.integers(1, 20_000))
        gate.push_mic(x[k : k + n])
        k = min(k + n, x.size)
        lo = max(k - MIC, 0)
        np.testing.assert_array_equal(gate.mic(lo - 5, k), np.concatenate((np.zeros(5), x[lo:k])))
    assert gate.mic_end == x.size


def test_gate_ring_in_steady_chunks_and_any_sample_type() -> None:
    gate = EchoGate(EchoGuard(), EchoGateParams(ring_ms=1000))
    x = (np.arange(40_000) % 20_000).astype(np.int16)
    n = 480  # 30 ms: the 16000-sample ring wraps mid-chunk (16000 is not a multiple of 480)
    for i, k in enumerate(range(0, x.size, n)):
        chunk = x[k : k + n]
        gate.push_mic((chunk, chunk.astype(np.float64) / 32768.0, chunk.astype(np.float32) / 32768.0)[i % 3])
        end = k + chunk.size
        lo = max(end - MIC, 0)
        np.testing.assert_array_equal(gate.mic(lo, end), x[lo:end].astype(np.float32) / 32768.0)
    assert gate.mic_end == x.size
    with pytest.raises(ValueError, match="mono"):
        gate.push_mic(np.zeros((2, 320), np.float32))


def test_emitted_output_plays_in_real_time_from_its_first_chunk() -> None:
    guard = EchoGuard()
    chunk = np.zeros(CHUNK, np.float32)
    # a response sent ahead of time: all chunks at mic sample 1000, playing back to back from there
    assert guard.note_emitted(chunk, 0, 1000, restart=True) == 1000
    assert guard.note_emitted(chunk, CHUNK, 1000, restart=False) == pytest.approx(1000 + CHUNK * 2 / 3)
    # TTS fell behind: the chunk due at 1000 + 2 * 1600 arrives at 9000 and plays on arrival
    assert guard.note_emitted(chunk, 2 * CHUNK, 9000, restart=False) == 9000
    assert guard.note_emitted(chunk, 3 * CHUNK, 9100, restart=False) == pytest.approx(9000 + CHUNK * 2 / 3)
    # paused, rewound to output sample 3000 and resumed at mic sample 20000
    assert guard.note_emitted(chunk, 3000, 20000, restart=True) == 20000
    assert guard.output_end() == pytest.approx(20000 + CHUNK * 2 / 3)


def test_a_stale_tracked_delay_does_not_hide_the_true_one() -> None:
    """The tracked delay is tried first; a correlation peak 13 samples before it (outside the reach of
    its FIR, which spans delays -8..+23 samples around it) is still refined."""
    guard = noted_guard()
    guard.delay = 4800
    score = np.zeros(8001)  # shift j = j_zero - delay; here j_lo = 0 and j_zero = 8000
    score[8000 - 4787] = 1.0
    shifts = guard._candidates(score, 0, 8000)
    assert shifts[0] == 8000 - 4800  # the tracked delay first
    assert 8000 - 4787 in shifts  # and the true peak
    for delay_ms in (300.0, 299.2, 300.0, 298.5):  # end to end: a delay that moves a little still fits
        mic = echo_path(delay_ms, 0.6, filt="flat", reflection=False, seed=12)
        for end in window_ends(delay_ms, step_ms=500):
            assert guard.check(mic[end - WINDOW : end], end).verdict in ("echo", "silence")
