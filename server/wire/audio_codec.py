"""Wire audio formats of the Realtime protocol: PCM16 (24 or 16 kHz) and G.711 μ-law / A-law (8 kHz).

Bytes ↔ float32 samples at the format's own rate; nothing more. Changing the rate (to the 16 kHz the
model hears, and back) is DSP, not wire: server/resampling.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np

with warnings.catch_warnings():
    # G.711 from the standard library's C codec (`audioop`: deprecated in 3.11-3.12, removed in 3.13, where the
    # `audioop-lts` package provides the same module): exact ITU-T tables at C speed per 20 ms frame.
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

Encoding = Literal["pcm16", "pcmu", "pcma"]
_PCM16 = np.dtype("<i2")
# A power of two: multiplying is exact, as dividing was. A float32 0-d array, not the numpy scalar: the same
# product, ~0.3 us sooner per 20 ms chunk (issue 14).
PCM16_SCALE = np.array(np.float32(1 / 32768))
PCM16_SCALE.setflags(write=False)
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

    @property
    def sample_bytes(self) -> int:
        """Bytes per sample on the wire: PCM16's two, G.711's one."""
        return 2 if self.encoding == "pcm16" else 1

    def to_ga(self) -> dict:
        if self.encoding == "pcm16":
            return {"type": "audio/pcm", "rate": self.rate}
        return {"type": f"audio/{self.encoding}"}


def decode(raw: bytes, fmt: AudioFormat) -> np.ndarray:
    """Wire bytes → float32 samples at fmt.rate."""
    if fmt.encoding == "pcm16":
        return pcm16_samples(raw) * PCM16_SCALE  # one pass, float32 (== astype(float32) / 32768)
    linear = audioop.ulaw2lin(raw, 2) if fmt.encoding == "pcmu" else audioop.alaw2lin(raw, 2)
    return np.frombuffer(linear, dtype=np.int16).astype(np.float32) / 32768.0


def pcm16_samples(raw: bytes) -> np.ndarray:
    """PCM16 wire bytes as int16 samples (a view); times `PCM16_SCALE` they are `decode`'s float32 samples."""
    check_pcm16(raw)
    return np.frombuffer(raw, _PCM16)


def check_pcm16(raw: bytes) -> None:
    """Refuse PCM16 wire bytes that are not whole samples."""
    if len(raw) % 2:
        raise AudioFormatError(f"PCM16 audio must have an even number of bytes; got {len(raw)}")


def encode(samples: np.ndarray, fmt: AudioFormat) -> bytes:
    """float32 samples at fmt.rate → wire bytes."""
    pcm = np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0)
    if fmt.encoding == "pcm16":
        return (pcm * 32767.0).astype("<i2").tobytes()
    linear = (pcm * 32767.0).astype(np.int16).tobytes()  # native order: what audioop reads
    return audioop.lin2ulaw(linear, 2) if fmt.encoding == "pcmu" else audioop.lin2alaw(linear, 2)
