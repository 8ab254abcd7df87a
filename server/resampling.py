"""Streaming resampling between the wire's audio rates and the 16 kHz the model hears (DSP, not wire).

Input is decoded to float32 (server/wire/audio_codec.py) and resampled to 16 kHz with one streaming
resampler per session (no clicks at chunk edges). The 16 kHz stream feeds the VAD and is what the model
hears (speech segments are slices of it), so the resampler is VITA's: torchaudio's default sinc filter
(`models.resample`), whose chunked output equals offline resampling of the whole stream. Output goes the
other way with the same class.
"""

from __future__ import annotations

from models.resample import StreamingResampler


class StreamResampler(StreamingResampler):
    """Chunk-by-chunk resampling that is seamless across chunks and equal to offline resampling.

    The concatenation of all outputs plus `flush()` equals `models.resample.resample` of the whole
    stream (torchaudio's `Resample`, as VITA used it), to float32 rounding. A chunk's output lags its
    input by `delay_samples` input samples (24 -> 16 kHz: 13, i.e. 0.54 ms); soxr's stream held back
    ~16 ms and emitted in bursts. Cost: ~4 us per 20 ms chunk at 24 -> 16 kHz (soxr: ~6.5 us; issue 14).
    A one-shot call (a fresh resampler, one chunk) must add `flush()` to get the tail. Equal rates pass
    samples through as float32.

    The models' class itself, under the server's name: it already passes equal rates through, and a wrapper
    around it cost a call per method on the input path (two per 32 ms pass; issue 14).
    """
