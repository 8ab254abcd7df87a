"""Echo guard: tell the assistant's own voice, coming back through the user's microphone, from the user.

Speakers feed what the client plays back into its microphone. Browser AEC often leaves a residue and
telephony has none, so the VAD hears the assistant and a naive duplex loop pauses (barge-in) on its own
voice. `EchoGuard` keeps what the session sent, placed on the microphone's 16 kHz sample timeline where
it was due to play, and explains a window of microphone audio by the best echo of it:

    mic[q] ~= sum_k h[k] * ref[q - d - k]          d in [min_delay, max_delay], k = a few taps around 0

The delay ``d`` is searched with one FFT cross-correlation (normalized per lag); the best few lags are
refined by a least-squares FIR of ``taps`` taps (2 ms), which absorbs a gain of any size, a polarity
flip, a fractional delay and mild filtering (loudspeaker, room, codec). What the fit leaves is the
*residual*: if it holds only a small fraction of the window's energy (``echo_ratio``) or is as quiet as
noise (``residual_floor_rms``), the window is echo only. A user speaking over the echo is not explained
by the reference, so the residual keeps their energy and the window counts as speech: the guard never
mutes the microphone, it only explains it.

`EchoGate` applies the guard to VAD segments (sans-I/O, in the session's microphone sample numbers): it
holds a new segment's start for ``decision_ms`` while output is playing, drops segments that are echo,
and keeps checking a dropped segment, so a user who starts talking over the echo (the VAD never sees a
new onset: the echo keeps it in speech) still produces a `SpeechStarted` ("promotion").

Everything is pure numpy (soxr for the output-rate to microphone-rate conversion) and never calls a
BLAS matrix product (a multithreaded BLAS on a busy server makes small products slow); there is no
clock. One check of a 0.4 s window over a 0.5 s delay range costs 1-2 ms of CPU: three FFTs of ~16k
points for the delay search, then a few FFTs of ~7k points and a 32x32 solve per candidate delay (the
first clear fit, usually the tracked delay, ends the search).

Limits: echo with strong late reverberation (direct-to-reverberant ratio below ~6 dB, a far-field
speaker in a live room) is only partly explained (``reverb_ratio`` trades this against a quiet user
over a loud echo); non-linear distortion (a clipping loudspeaker) and a playback clock that drifts
faster than the delay search follows are not modelled. Such setups need a real adaptive AEC upstream.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .events import Event, SpeechDiscarded, SpeechEnded, SpeechStarted
from .vad import VadEvent, VadSpeechDiscard, VadSpeechEnd, VadSpeechStart

Verdict = Literal["echo", "speech", "silence", "no_output", "disabled"]


@dataclass(frozen=True, slots=True)
class EchoGuardParams:
    """Echo-path search range and decision thresholds.

    ``min_delay_ms``/``max_delay_ms``: how much later than its scheduled play position the output may
    come back (network, jitter buffer, device and acoustic latency). ``taps``: FIR length of the echo
    path model (samples at ``mic_rate``, 32 = 2 ms); ``tap_lead`` of them reach before the delay, so a
    play position estimated a little late still fits. ``candidates``: correlation peaks refined per
    check (after the last clearly fitted delay, which is tried first).

    A window is "echo" when the fit leaves at most ``echo_ratio`` of its energy (or a residual no louder
    than ``residual_floor_rms``, which is noise) and fewer than ``speech_frames`` frames of ``frame_ms``
    are unexplained: a frame is unexplained when the residual keeps more than ``frame_ratio`` of its
    energy, is louder than ``residual_floor_rms`` and louder than ``reverb_ratio`` times the echo's
    recent frame-energy peak decayed at 60 dB per ``reverb_rt60_ms`` (the room's tail of the echo, which
    the short FIR does not model; 0 turns this off). Unexplained frames catch a user who starts talking
    late in the window.
    ``min_mic_rms``: quieter windows are "silence". ``min_ref_rms``: quieter reference means nothing was
    playing ("no_output"). ``max_gain``: an echo louder than this times the output is not believed.
    ``history_s``: how long output is kept after it played (`EchoGate` prunes it).
    """

    enabled: bool = True
    min_delay_ms: float = 0.0
    max_delay_ms: float = 500.0
    taps: int = 32
    tap_lead: int = 8
    candidates: int = 3
    echo_ratio: float = 0.35
    frame_ms: float = 32.0
    frame_ratio: float = 0.5
    speech_frames: int = 3
    reverb_ratio: float = 0.5
    reverb_rt60_ms: float = 600.0
    residual_floor_rms: float = 0.003
    min_mic_rms: float = 0.002
    min_ref_rms: float = 0.001
    max_gain: float = 4.0
    history_s: float = 10.0
    mic_rate: int = 16_000
    output_rate: int = 24_000

    def __post_init__(self) -> None:
        if not 0 <= self.min_delay_ms <= self.max_delay_ms:
            raise ValueError("need 0 <= min_delay_ms <= max_delay_ms")
        if self.history_s <= 0 or self.frame_ms <= 0:
            raise ValueError("history_s and frame_ms must be > 0")
        if self.taps < 1 or not 0 <= self.tap_lead < self.taps:
            raise ValueError("need taps >= 1 and 0 <= tap_lead < taps")
        if not 0 < self.echo_ratio < 1 or not 0 < self.frame_ratio <= 1:
            raise ValueError("echo_ratio must be in (0, 1) and frame_ratio in (0, 1]")
        if self.candidates < 1 or self.speech_frames < 1:
            raise ValueError("candidates and speech_frames must be >= 1")
        if self.mic_rate <= 0 or self.output_rate <= 0:
            raise ValueError("sample rates must be > 0")
        if self.reverb_rt60_ms <= 0:
            raise ValueError("reverb_rt60_ms must be > 0")
        for name in ("reverb_ratio", "residual_floor_rms", "min_mic_rms", "min_ref_rms", "max_gain"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def ms(self, ms: float) -> int:
        """``ms`` milliseconds in microphone samples."""
        return round(ms * self.mic_rate / 1000)


@dataclass(frozen=True, slots=True)
class EchoCheck:
    """What `EchoGuard.check` found for one microphone window.

    ``ratio``: residual energy / microphone energy (1.0 when nothing was fitted). ``delay``: the echo
    delay in microphone samples (None without a fit); ``gain``: echo RMS / aligned reference RMS.
    ``unexplained``: frames the echo does not explain; ``speech_sample``: the microphone sample where the
    first of them starts (None if none). ``residual``: the microphone minus the fitted echo (the window
    itself when nothing was fitted).
    """

    verdict: Verdict
    ratio: float
    delay: int | None
    gain: float
    mic_rms: float
    residual_rms: float
    unexplained: int
    speech_sample: int | None
    residual: np.ndarray = field(compare=False, repr=False)

    @property
    def is_echo(self) -> bool:
        return self.verdict == "echo"


def _as_float32(samples: np.ndarray) -> np.ndarray:
    if type(samples) is np.ndarray and samples.ndim == 1 and samples.dtype == np.float32:
        return samples  # what the rest returns for it (the common case: decoded, resampled audio)
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"expected mono 1-D samples, got shape {x.shape}")
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    return x.astype(np.float32, copy=False)


def _fft_size(n: int) -> int:
    """The smallest 2^a * 3^b >= n (fast for pocketfft, at most 1.5x n... or 2x)."""
    best = 1 << max(n - 1, 0).bit_length()
    p3 = 1
    while p3 < best:
        p2 = p3
        while p2 < n:
            p2 *= 2
        best = min(best, p2)
        p3 *= 3
    return best


def _energy(v: np.ndarray) -> float:
    # einsum, not a BLAS dot: a multithreaded BLAS on a busy server makes tiny products slow
    return float(np.einsum("i,i->", v, v))


def _gram(seg: np.ndarray, n: int, k: int) -> np.ndarray:
    """G[t, u] = seg[t : t + n] @ seg[u : u + n] for t, u < k (len(seg) == n + k - 1), exactly, without
    a BLAS matrix product: G[t, t + d] = A_d(t), A_d(0) by one FFT autocorrelation and
    A_d(t) = A_d(0) - sum_{v < t} seg[v] seg[v + d] + sum_{v < t} seg[n + v] seg[n + v + d]."""
    size = _fft_size(seg.size)  # circular is exact: d + i <= len(seg) - 1
    f = np.fft.rfft(seg, size)
    a0 = np.fft.irfft(f * np.conj(np.fft.rfft(seg[:n], size)), size)[:k]  # a0[d] = seg[:n] @ seg[d : d + n]
    if k == 1:
        return a0.reshape(1, 1).copy()
    pad = np.concatenate((seg, np.zeros(k, seg.dtype)))
    head = seg[: k - 1, None] * sliding_window_view(pad[: 2 * k - 2], k)  # head[v, d] = seg[v] seg[v + d]
    tail = pad[n : n + k - 1, None] * sliding_window_view(pad[n : n + 2 * k - 2], k)
    acc = np.zeros((k, k))  # acc[t, d] = A_d(t)
    acc[1:] = np.cumsum(tail - head, axis=0)
    acc += a0[None, :]
    t, u = _triu(k)
    gram = np.empty((k, k))
    gram[t, u] = acc[t, u - t]
    gram[u, t] = acc[t, u - t]
    return gram


@lru_cache(maxsize=8)
def _triu(k: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(k)


def _rms(energy: float, n: int) -> float:
    return math.sqrt(max(energy, 0.0) / n) if n else 0.0


class EchoGuard:
    """The output a session sent, on the microphone timeline, and the echo check against it.

    ``note_output(pcm, play_start)``: ``pcm`` (at ``output_rate``) starts playing at microphone sample
    ``play_start`` (a float). Output is kept on an integer output-rate grid: a chunk that starts within
    one output sample of where the previous one ended continues it exactly, so chunked output is placed
    as if sent whole. Later output replaces whatever was scheduled from its start on (a rewind);
    `discard_from` forgets output the client dropped; `forget_before` drops what is too old to matter.
    """

    def __init__(self, params: EchoGuardParams | None = None) -> None:
        p = self.params = params or EchoGuardParams()
        self._scale = p.output_rate / p.mic_rate  # output samples per mic sample
        g = math.gcd(p.output_rate, p.mic_rate)
        self._mic_period = p.mic_rate // g  # mic samples spanning a whole number of output samples
        self._grid: list[int] = []  # chunk starts on the output-rate grid, ascending, never overlapping
        self._chunks: list[np.ndarray] = []
        self.delay: int | None = None  # last confidently found echo delay (mic samples)
        self._anchor: tuple[float, int] | None = None  # (mic sample, output sample) playing then

    # --- output -----------------------------------------------------------------------------------

    def note_output(self, pcm: np.ndarray, play_start: float) -> None:
        x = _as_float32(pcm)
        if x.size == 0:
            return
        pos = play_start * self._scale
        if self._grid and abs(pos - self._grid_end(-1)) <= 1.0:
            g = self._grid_end(-1)  # continues the previous chunk exactly
        else:
            g = math.floor(pos + 0.5)
            self._cut(g)
        self._grid.append(g)
        self._chunks.append(x.copy())

    def note_emitted(self, pcm: np.ndarray, out_start: int, mic_now: int, restart: bool) -> float:
        """Record output the runtime just sent, where the client will play it; returns that position.

        ``out_start``: the chunk's first sample on the response's output timeline; ``mic_now``: the
        microphone samples received when it was sent; ``restart``: playback (re)starts with this chunk
        (a response's first chunk, or the first after a pause). Playback then runs in real time from
        ``mic_now``; a chunk sent after the client would have run dry (TTS slower than real time) plays
        on arrival and re-anchors the rest. What is left over (network, jitter buffer, device) is the
        echo delay the check searches.
        """
        if restart or self._anchor is None:
            self._anchor = (float(mic_now), out_start)
        mic0, out0 = self._anchor
        play = mic0 + (out_start - out0) / self._scale
        if play < mic_now:
            self._anchor = (float(mic_now), out_start)
            play = float(mic_now)
        self.note_output(pcm, play)
        return play

    def forget_before(self, mic_sample: float) -> None:
        """Drop output that ended before ``mic_sample`` (`EchoGate.push_mic` calls this with the
        microphone's position less ``history_s``; output sent ahead of its playback is kept)."""
        before = mic_sample * self._scale
        drop = 0
        while drop < len(self._grid) and self._grid_end(drop) < before:
            drop += 1
        if drop:
            del self._grid[:drop]
            del self._chunks[:drop]

    def discard_from(self, mic_sample: float) -> None:
        """Forget output scheduled at or after ``mic_sample`` (the client dropped it)."""
        self._cut(math.ceil(mic_sample * self._scale))

    def _cut(self, g: int) -> None:
        while self._grid and self._grid[-1] >= g:
            self._grid.pop()
            self._chunks.pop()
        if self._grid and self._grid_end(-1) > g:
            self._chunks[-1] = self._chunks[-1][: g - self._grid[-1]]

    def clear(self) -> None:
        self._grid.clear()
        self._chunks.clear()

    def _grid_end(self, i: int) -> int:
        return self._grid[i] + self._chunks[i].size

    @property
    def holds_output(self) -> bool:
        """Whether any output is stored (playing, due to play, or within the history kept for checks)."""
        return bool(self._grid)

    def output_end(self) -> float:
        """Microphone sample where the stored output ends (0.0 when none is stored)."""
        return self._grid_end(-1) / self._scale if self._grid else 0.0

    def playing_during(self, start: int, end: int) -> bool:
        """Whether any stored output could echo into microphone samples [start, end)."""
        p = self.params
        lo = (start - p.ms(p.max_delay_ms) - p.taps) * self._scale
        hi = (end - p.ms(p.min_delay_ms) + p.taps) * self._scale
        i = bisect_left(self._grid, hi)  # chunks never overlap: their ends ascend with their starts
        return i > 0 and self._grid_end(i - 1) > lo

    def reference(self, start: int, end: int) -> np.ndarray:
        """The stored output as it plays in microphone samples [start, end) (zeros where none)."""
        n = end - start
        if n <= 0:
            return np.zeros(0, np.float32)
        p = self.params
        if p.output_rate == p.mic_rate:
            buf = np.zeros(n, np.float32)
            self._place(buf, start)
            return buf
        # Lay the output on its own grid from a mic sample that falls on a whole output sample (with a
        # margin for the resampler's edges), convert once, and cut [start, end) out of the result.
        origin = (start - 32) // self._mic_period * self._mic_period
        stop = end + 32
        buf = np.zeros(round((stop - origin) * self._scale), np.float32)
        if not self._place(buf, round(origin * self._scale)):
            return np.zeros(n, np.float32)
        import soxr

        out = soxr.resample(buf, p.output_rate, p.mic_rate, quality="MQ")[start - origin : end - origin]
        if out.size < n:
            out = np.pad(out, (0, n - out.size))
        return np.asarray(out, np.float32)

    def _place(self, buf: np.ndarray, g0: int) -> bool:
        """Copy the stored output on grid [g0, g0 + len(buf)) into ``buf``; whether any was there."""
        placed = False
        i = bisect_left(self._grid, g0 + buf.size)
        while i > 0:
            i -= 1
            g, chunk = self._grid[i], self._chunks[i]
            if g + chunk.size <= g0:
                break  # chunks never overlap, so every earlier one ends earlier still
            a, b = max(g, g0), min(g + chunk.size, g0 + buf.size)
            buf[a - g0 : b - g0] = chunk[a - g : b - g]
            placed = True
        return placed

    # --- the check --------------------------------------------------------------------------------

    def check(self, mic: np.ndarray, mic_end: int) -> EchoCheck:
        """Explain microphone samples [mic_end - len(mic), mic_end) by the echo of the stored output."""
        p = self.params
        m = _as_float32(mic).astype(np.float64)
        n = m.size
        em = _energy(m)
        mic_rms = _rms(em, n)
        if not p.enabled:
            return self._unfitted("disabled", m, mic_end, mic_rms)
        if n == 0 or mic_rms < p.min_mic_rms:
            return self._unfitted("silence", m, mic_end, mic_rms)
        dmin, dmax = p.ms(p.min_delay_ms), p.ms(p.max_delay_ms)
        lead, lag = p.tap_lead, p.taps - 1 - p.tap_lead  # taps reach k in [-lead, lag]
        # x[0] is the reference at mic position a. m[i] (position mic_end - n + i) meets x[j + i] for the
        # shift j = mic_end - n - d - a, so d in [dmin, dmax] is j in [lag, lag + dmax - dmin].
        a = mic_end - n - dmax - lag
        x = self.reference(a, mic_end - dmin + lead).astype(np.float64)
        floor = (p.min_ref_rms**2) * n  # a window's worth of reference at min_ref_rms
        if _energy(x) < floor:
            return self._unfitted("no_output", m, mic_end, mic_rms)
        j_lo, j_hi = lag, lag + dmax - dmin
        # Circular correlation is exact for shifts j <= x.size - n, so x.size FFT points suffice.
        size = _fft_size(x.size)
        corr = np.fft.irfft(np.fft.rfft(x, size) * np.conj(np.fft.rfft(m, size)), size)
        cx = np.concatenate(([0.0], np.cumsum(x * x)))
        ex = cx[j_lo + n : j_hi + n + 1] - cx[j_lo : j_hi + 1]  # reference energy under each shift
        cj = corr[j_lo : j_hi + 1]
        score = np.where(ex > floor, cj * cj / np.maximum(ex, floor), 0.0)  # single-tap explained energy
        best: tuple[float, int, np.ndarray] | None = None
        for j in self._candidates(score, j_lo, mic_end - n - a):
            # FIR over seg = x[j - lag : j + lead + n]: row t = seg[t : t + n] is tap k = lag - t, and
            # row t @ m = corr[j - lag + t].
            seg = x[j - lag : j + lead + n]
            gram = _gram(seg, n, p.taps)
            rhs = corr[j - lag : j + lead + 1]
            gram[np.diag_indices_from(gram)] += 1e-9 * float(np.trace(gram)) / p.taps + 1e-12
            try:
                h = np.linalg.solve(gram, rhs)
            except np.linalg.LinAlgError:
                h = np.linalg.lstsq(gram, rhs, rcond=None)[0]
            er = em - float(np.einsum("i,i->", h, rhs))  # the least-squares residual energy
            if best is None or er < best[0]:
                best = (er, j, h)
            if er <= 0.5 * p.echo_ratio * em:
                break  # a clear fit: no other delay can change the verdict
        if best is None:  # no shift has a window's worth of reference under it
            return self._unfitted("no_output", m, mic_end, mic_rms)
        _, j, h = best
        seg = x[j - lag : j + lead + n]
        fsize = _fft_size(seg.size)
        echo = np.fft.irfft(np.fft.rfft(seg, fsize) * np.conj(np.fft.rfft(h, fsize)), fsize)[:n]
        resid = m - echo
        er = _energy(resid)
        ratio = min(er / em, 1.0)
        gain = math.sqrt(_energy(echo) / max(_energy(x[j : j + n]), 1e-20))
        delay = mic_end - n - a - j
        res_rms = _rms(er, n)
        unexplained, first = self._unexplained(m, resid, mic_end, echo)
        explained = ratio <= p.echo_ratio or res_rms <= p.residual_floor_rms
        echo_only = explained and unexplained < p.speech_frames and gain <= p.max_gain
        if echo_only and ratio <= p.echo_ratio / 2:
            self.delay = delay  # a clear fit: try this delay first next time
        return EchoCheck(
            "echo" if echo_only else "speech", ratio, delay, gain, mic_rms, res_rms, unexplained, first,
            resid.astype(np.float32),
        )  # fmt: skip

    def _unfitted(self, verdict: Verdict, m: np.ndarray, mic_end: int, mic_rms: float) -> EchoCheck:
        unexplained, first = self._unexplained(m, m, mic_end, None)
        return EchoCheck(verdict, 1.0, None, 0.0, mic_rms, mic_rms, unexplained, first, m.astype(np.float32))

    def _unexplained(
        self, m: np.ndarray, resid: np.ndarray, mic_end: int, echo: np.ndarray | None
    ) -> tuple[int, int | None]:
        """Frames (aligned to the window's end) whose residual keeps more than ``frame_ratio`` of their
        energy, is louder than the noise floor and than the echo's reverberation budget; and the mic
        sample where the first of them starts."""
        p = self.params
        f = max(p.ms(p.frame_ms), 1)
        k = m.size // f
        if k == 0:
            return 0, None
        mf = m[m.size - k * f :].reshape(k, f)
        rf = resid[m.size - k * f :].reshape(k, f)
        em = np.einsum("ij,ij->i", mf, mf)
        er = np.einsum("ij,ij->i", rf, rf)
        flag = (er > p.frame_ratio * em) & (er > p.residual_floor_rms**2 * f)
        if p.reverb_ratio > 0 and echo is not None:
            # The room's reverberation of the echo is not in a 2 ms FIR: a residual within what the
            # echo's recent peak leaves, decaying 60 dB per rt60, is the echo's tail, not the user.
            ef = echo[m.size - k * f :].reshape(k, f)
            ee = np.einsum("ij,ij->i", ef, ef)
            decay = 10 ** (-6 * p.frame_ms / p.reverb_rt60_ms)
            budget = np.empty(k)
            peak = 0.0
            for i in range(k):
                peak = max(peak * decay, float(ee[i]))
                budget[i] = peak
            flag &= er > p.reverb_ratio * budget
        idx = np.flatnonzero(flag)
        if idx.size == 0:
            return 0, None
        return int(idx.size), mic_end - (k - int(idx[0])) * f

    def _candidates(self, score: np.ndarray, j_lo: int, j_zero: int) -> list[int]:
        """Shifts to refine: the tracked delay's first (``j_zero`` is the shift of delay 0), then the
        best ``candidates`` peaks of the single-tap score (half the FIR apart from each other, at least
        a quarter of the top score)."""
        p = self.params
        sep = max(p.taps // 2, 1)
        shifts: list[int] = []
        if self.delay is not None and j_lo <= j_zero - self.delay < j_lo + score.size:
            shifts.append(j_zero - self.delay)
        s = score.copy()
        top = float(s.max())
        for _ in range(p.candidates):
            q = int(np.argmax(s))
            if s[q] <= 0 or s[q] < 0.25 * top:
                break
            if j_lo + q not in shifts:  # near the tracked delay is not enough: its FIR may miss it
                shifts.append(j_lo + q)
            s[max(q - sep, 0) : q + sep] = 0.0
        return shifts

    def is_echo(self, mic: np.ndarray, mic_end: int) -> bool:
        """Whether microphone samples [mic_end - len(mic), mic_end) are the session's own output only."""
        return self.check(mic, mic_end).is_echo

    def residual(self, mic: np.ndarray, mic_end: int) -> np.ndarray:
        """The microphone window minus the best fitted echo of the stored output."""
        return self.check(mic, mic_end).residual


# --- the gate between the VAD and the controller ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class EchoGateParams:
    """How `EchoGate` applies the guard to VAD segments.

    ``decision_ms``: microphone audio after a segment's onset that the check waits for when output may
    be echoing (the added barge-in latency; no wait when nothing is playing). ``window_ms``: the
    microphone window of each check. ``recheck_ms``: how often a segment taken for echo is checked
    again on its newest ``window_ms``; ``promote_after`` checks in a row that find unexplained speech
    turn it into user speech. ``prefix_padding_ms``: kept before the first unexplained frame of a
    promoted segment. ``clean_promoted``: a promoted segment's audio is handed on with the fitted echo
    subtracted. ``ring_ms``: microphone audio kept for the checks.
    """

    decision_ms: float = 200.0
    window_ms: float = 400.0
    recheck_ms: float = 100.0
    promote_after: int = 2
    prefix_padding_ms: float = 300.0
    clean_promoted: bool = True
    ring_ms: float = 2000.0

    def __post_init__(self) -> None:
        if self.decision_ms < 0 or self.prefix_padding_ms < 0:
            raise ValueError("decision_ms and prefix_padding_ms must be >= 0")
        if self.window_ms <= 0 or self.recheck_ms <= 0:
            raise ValueError("window_ms and recheck_ms must be > 0")
        if self.promote_after < 1:
            raise ValueError("promote_after must be >= 1")
        if self.ring_ms < self.window_ms + self.decision_ms:
            raise ValueError("ring_ms must hold window_ms + decision_ms")


SegmentState = Literal["pending", "passed", "echo", "promoted"]


@dataclass(slots=True)
class _Segment:
    start: int
    onset: int
    state: SegmentState
    next_check: int = 0
    speech_checks: int = 0
    speech_sample: int | None = None


@dataclass(slots=True)
class EchoGateStats:
    passed: int = 0  # segments handed on at their onset (nothing playing, or not echo)
    echo: int = 0  # segments that ended as echo and were dropped
    promoted: int = 0  # echo segments that turned into user speech
    checks: int = 0


class EchoGate:
    """VAD events in, controller events (`duplex.events`) out, with the assistant's echo taken out.

    Sans-I/O, on the session's microphone sample numbers. Feed every microphone chunk to `push_mic`
    *before* the VAD sees it, and every VAD event to `on_vad` (with the sample number where the VAD
    stream began); hand the returned events to the controller in order.

    * Nothing playing (or the guard disabled): segments pass through unchanged, with no delay.
    * Output playing: a `SpeechStarted` is held until ``decision_ms`` of audio after the onset is in,
      then the window ending there is checked. User speech: the start goes on (the controller pauses
      output as usual). Echo: the segment is dropped: no start, no end, nothing paused or probed.
    * A dropped segment is checked again every ``recheck_ms`` on its newest audio: the echo keeps the
      VAD in speech, so a user talking over it makes no new onset. After ``promote_after`` checks in a
      row with unexplained speech the segment is promoted: `SpeechStarted` at the first unexplained
      frame less the prefix padding, and its `SpeechEnded` carries the audio from there (echo removed
      with ``clean_promoted``).
    """

    def __init__(self, guard: EchoGuard, params: EchoGateParams | None = None) -> None:
        self.guard = guard
        self.params = params or EchoGateParams()
        gp = guard.params
        self._decision = gp.ms(self.params.decision_ms)
        self._window = max(gp.ms(self.params.window_ms), 1)
        self._every = max(gp.ms(self.params.recheck_ms), 1)
        self._pad = gp.ms(self.params.prefix_padding_ms)
        self._ring = np.zeros(max(gp.ms(self.params.ring_ms), 1), np.float32)  # sample q at q % size
        self._end = 0  # microphone samples pushed
        self._seg: _Segment | None = None
        self.stats = EchoGateStats()
        self.last_check: EchoCheck | None = None

    @property
    def mic_end(self) -> int:
        """Microphone samples pushed so far (the session's sample count)."""
        return self._end

    @property
    def state(self) -> SegmentState | None:
        """The open segment's state, None when there is none."""
        return None if self._seg is None else self._seg.state

    def reset(self) -> None:
        """The VAD stream was replaced: forget the open segment (the microphone audio is kept)."""
        self._seg = None

    def mic(self, start: int, end: int) -> np.ndarray:
        """Microphone samples [start, end) still held (zeros before the first sample or the ring)."""
        out = np.zeros(max(end - start, 0), np.float32)
        size = self._ring.size
        a, b = max(start, self._end - size, 0), min(end, self._end)
        while a < b:  # at most two pieces: up to the ring's end, then from its start
            i = a % size
            n = min(b - a, size - i)
            out[a - start : a - start + n] = self._ring[i : i + n]
            a += n
        return out

    # --- inputs -----------------------------------------------------------------------------------

    def push_mic(self, samples: np.ndarray) -> list[Event]:
        x = _as_float32(samples)
        ring = self._ring
        size, n = ring.size, x.size
        if n > size:
            self._end += n - size
            x, n = x[-size:], size
        i = self._end % size
        if i + n <= size:  # one slice (a 20 ms chunk wraps once per ring's length)
            ring[i : i + n] = x
        else:
            ring[i:] = x[: size - i]
            ring[: i + n - size] = x[size - i :]
        end = self._end = self._end + n
        guard = self.guard
        if guard._grid:  # output to forget (none while nothing played lately: a 20 ms push skips the call)
            gp = guard.params
            guard.forget_before(end - gp.history_s * gp.mic_rate)
        seg = self._seg
        if seg is None:
            return []
        if seg.state == "pending" and end >= seg.onset + self._decision:
            return self._decide(seg, seg.onset + self._decision)
        if seg.state == "echo" and end >= seg.next_check:
            return self._recheck(seg)
        return []

    def on_vad(self, event: VadEvent, base: int = 0) -> list[Event]:
        """One `duplex.vad` event; ``base`` is the session sample where its VAD stream began."""
        if isinstance(event, VadSpeechStart):
            seg = _Segment(base + event.start_sample, base + event.onset_sample, "pending")
            self._seg = seg
            deadline = seg.onset + self._decision
            if not self.guard.params.enabled or not self.guard.playing_during(
                deadline - self._window, deadline
            ):
                return self._pass(seg)
            if self.mic_end >= deadline:
                return self._decide(seg, deadline)
            return []
        seg, self._seg = self._seg, None
        if isinstance(event, VadSpeechEnd):
            start, end = base + event.start_sample, base + event.end_sample
            if seg is None:
                return [SpeechEnded(start, end, event.audio)]
            if seg.state == "pending":
                out = self._decide(seg, min(end, self.mic_end))
                if seg.state == "echo":
                    self.stats.echo += 1
                    return []
                return [*out, SpeechEnded(start, end, event.audio)]
            if seg.state == "echo":
                self.stats.echo += 1
                return []
            if seg.state == "promoted":
                s = min(max(seg.start, start), end)
                audio = np.asarray(event.audio, np.float32)[s - start :]
                if self.params.clean_promoted and audio.size:
                    audio = self.guard.check(audio, end).residual
                return [SpeechEnded(s, end, audio)]
            return [SpeechEnded(start, end, event.audio)]
        if isinstance(event, VadSpeechDiscard):
            start, end = base + event.start_sample, base + event.end_sample
            if seg is None or seg.state in ("passed", "promoted"):
                return [SpeechDiscarded(seg.start if seg is not None else start, max(end, start))]
            return []  # never announced: nothing to take back
        raise TypeError(f"not a VAD event: {type(event).__name__}")

    # --- decisions --------------------------------------------------------------------------------

    def _check(self, end: int) -> EchoCheck:
        self.stats.checks += 1
        self.last_check = self.guard.check(self.mic(end - self._window, end), end)
        return self.last_check

    def _pass(self, seg: _Segment) -> list[Event]:
        seg.state = "passed"
        self.stats.passed += 1
        return [SpeechStarted(seg.start)]

    def _decide(self, seg: _Segment, end: int) -> list[Event]:
        if self._check(end).is_echo:
            seg.state = "echo"
            seg.next_check = end + self._every
            return []
        return self._pass(seg)

    def _recheck(self, seg: _Segment) -> list[Event]:
        end = self.mic_end
        seg.next_check = end + self._every
        check = self._check(end)
        # User speech: what the echo leaves (all of it once the output stopped) holds enough loud frames.
        if (
            check.verdict not in ("speech", "no_output")
            or check.unexplained < self.guard.params.speech_frames
        ):
            seg.speech_checks, seg.speech_sample = 0, None
            return []
        seg.speech_checks += 1
        if seg.speech_sample is None:
            seg.speech_sample = check.speech_sample
        if seg.speech_checks < self.params.promote_after:
            return []
        seg.state = "promoted"
        assert seg.speech_sample is not None
        seg.start = max(seg.start, seg.speech_sample - self._pad)
        self.stats.promoted += 1
        return [SpeechStarted(seg.start)]
