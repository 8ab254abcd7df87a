"""Streaming resampling between the wire's audio rates and the 16 kHz the model hears (DSP, not wire).

Input is decoded to float32 (server/wire/audio_codec.py) and resampled to 16 kHz with one streaming
resampler per session (no clicks at chunk edges). The 16 kHz stream feeds the VAD and is what the model
hears (speech segments are slices of it), so the resampler is VITA's: torchaudio's default sinc filter
(`models.resample`), whose chunked output equals offline resampling of the whole stream. Output goes the
other way with the same class.
"""

from __future__ import annotations

import numpy as np

from models.resample import StreamingResampler


class StreamResampler:
    """Chunk-by-chunk resampling that is seamless across chunks and equal to offline resampling.

    The concatenation of all outputs plus `flush()` equals `models.resample.resample` of the whole
    stream (torchaudio's `Resample`, as VITA used it), to float32 rounding. A chunk's output lags its
    input by `delay_samples` input samples (24 -> 16 kHz: 13, i.e. 0.54 ms); soxr's stream held back
    ~16 ms and emitted in bursts. Cost: ~4 us per 20 ms chunk at 24 -> 16 kHz (soxr: ~6.5 us; issue 14).
    A one-shot call (a fresh resampler, one chunk) must add `flush()` to get the tail.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self._stream = None if in_rate == out_rate else StreamingResampler(in_rate, out_rate)

    @property
    def delay_samples(self) -> int:
        """Input samples held back until more input (or `flush`) arrives."""
        return 0 if self._stream is None else self._stream.delay_samples

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        if self._stream is None:
            return samples.astype(np.float32, copy=False)
        return self._stream(samples)

    def scaled(self, samples: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """``self(samples * scale)`` for int16 samples and a float32 scale, without the float32 copy between."""
        if self._stream is None:
            return samples * scale
        return self._stream.scaled(samples, scale)

    def would_emit(self, more: int) -> int:
        """How many 16 kHz samples `more` further input samples would return now (in one chunk or several)."""
        return more if self._stream is None else self._stream.would_emit(more)

    def inputs_below(self, out: int) -> int:
        """The most further input samples that return fewer than `out` 16 kHz samples (`would_emit` inverted)."""
        return out - 1 if self._stream is None else self._stream.inputs_below(out)

    def flush(self) -> np.ndarray:
        """End of stream: the held-back tail (empty when the rates are equal); the resampler starts over."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.flush()
