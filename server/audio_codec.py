"""Wire audio formats of the Realtime protocol: PCM16 (24 or 16 kHz) and G.711 μ-law / A-law (8 kHz).

Input is decoded to float32 and resampled to 16 kHz with a streaming resampler per session (no clicks
at chunk edges). The 16 kHz stream feeds the VAD and is what the model hears (speech segments are slices
of it), so the resampler is VITA's: torchaudio's default sinc filter (`models.resample`), whose chunked
output equals offline resampling of the whole stream. Output goes the other way with the same class.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Literal

import numpy as np

Encoding = Literal["pcm16", "pcmu", "pcma"]
ACCEPTED = "audio/pcm (PCM16 mono little-endian) at 16000 or 24000 Hz, audio/pcmu or audio/pcma at 8000 Hz"


class AudioFormatError(ValueError):
    pass


@dataclass(frozen=True)
class AudioFormat:
    encoding: Encoding = "pcm16"
    rate: int = 24000

    @classmethod
    def parse(cls, spec: object) -> AudioFormat:
        """GA `{"type": "audio/pcm", "rate": 24000}` or beta "pcm16" | "g711_ulaw" | "g711_alaw"."""
        if isinstance(spec, str):
            beta = {"pcm16": cls("pcm16", 24000), "g711_ulaw": cls("pcmu", 8000), "g711_alaw": cls("pcma", 8000)}
            if spec in beta:
                return beta[spec]
        elif isinstance(spec, dict):
            kind, rate = spec.get("type"), spec.get("rate", 24000)
            if kind == "audio/pcm" and rate in (16000, 24000):
                return cls("pcm16", int(rate))
            if kind in ("audio/pcmu", "audio/pcma"):
                return cls("pcmu" if kind == "audio/pcmu" else "pcma", 8000)
        raise AudioFormatError(f"unsupported audio format {spec!r}; accepted: {ACCEPTED}")

    def to_ga(self) -> dict:
        if self.encoding == "pcm16":
            return {"type": "audio/pcm", "rate": self.rate}
        return {"type": f"audio/{self.encoding}"}


def decode_base64(data: object) -> bytes:
    if not isinstance(data, str):
        raise AudioFormatError("audio must be a base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AudioFormatError(f"audio is not valid base64: {exc}") from None


def _mulaw_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.uint8)
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = ((mantissa.astype(np.int32) << 3) + 0x84) << exponent
    return np.where(sign != 0, 0x84 - magnitude, magnitude - 0x84).astype(np.float32) / 32768.0


def _alaw_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.uint8) ^ 0x55
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = (codes & 0x0F).astype(np.int32)
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << (exponent - 1))
    return np.where(sign != 0, magnitude, -magnitude).astype(np.float32) / 32768.0


_MULAW = _mulaw_table()
_ALAW = _alaw_table()


def decode(raw: bytes, fmt: AudioFormat) -> np.ndarray:
    """Wire bytes → float32 samples at fmt.rate."""
    if fmt.encoding == "pcm16":
        if len(raw) % 2:
            raise AudioFormatError(f"PCM16 audio must have an even number of bytes; got {len(raw)}")
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    table = _MULAW if fmt.encoding == "pcmu" else _ALAW
    return table[np.frombuffer(raw, dtype=np.uint8)]


def encode(samples: np.ndarray, fmt: AudioFormat) -> bytes:
    """float32 samples at fmt.rate → wire bytes."""
    pcm = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    if fmt.encoding == "pcm16":
        return (pcm * 32767.0).astype("<i2").tobytes()
    table = _MULAW if fmt.encoding == "pcmu" else _ALAW
    # nearest code by value: the tables are small, searchsorted over the sorted table
    order = np.argsort(table)
    sorted_vals = table[order]
    idx = np.clip(np.searchsorted(sorted_vals, pcm), 1, 255)
    left, right = sorted_vals[idx - 1], sorted_vals[idx]
    idx = np.where(np.abs(pcm - left) <= np.abs(pcm - right), idx - 1, idx)
    return order[idx].astype(np.uint8).tobytes()


class StreamResampler:
    """Chunk-by-chunk resampling that is seamless across chunks and equal to offline resampling.

    The concatenation of all outputs plus `flush()` equals `models.resample.resample` of the whole
    stream (torchaudio's `Resample`, as VITA used it), to float32 rounding. A chunk's output lags its
    input by `delay_samples` input samples (24 -> 16 kHz: 13, i.e. 0.54 ms); soxr's stream held back
    ~16 ms and emitted in bursts. Cost: ~9 us per 20 ms chunk at 24 -> 16 kHz (soxr: ~6.5 us).
    A one-shot call (a fresh resampler, one chunk) must add `flush()` to get the tail.
    """

    def __init__(self, in_rate: int, out_rate: int) -> None:
        # Imported here: the Python client imports this module for AudioFormat/encode and needs no torch.
        from models.resample import StreamingResampler

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

    def flush(self) -> np.ndarray:
        """End of stream: the held-back tail (empty when the rates are equal); the resampler starts over."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        return self._stream.flush()
