"""Wire audio formats of the Realtime protocol: PCM16 (24 or 16 kHz) and G.711 μ-law / A-law (8 kHz).

Bytes ↔ float32 samples at the format's own rate; nothing more. Changing the rate (to the 16 kHz the
model hears, and back) is DSP, not wire: server/resampling.py.
"""

from __future__ import annotations

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


def _sorted(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(table)  # default sort kind: ties (+0 and -0) map to the codes they always did
    return order, table[order]


_MULAW_SORTED = _sorted(_MULAW)
_ALAW_SORTED = _sorted(_ALAW)


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
    order, sorted_vals = _MULAW_SORTED if fmt.encoding == "pcmu" else _ALAW_SORTED
    # nearest code by value: searchsorted over the table sorted once at import
    idx = np.clip(np.searchsorted(sorted_vals, pcm), 1, 255)
    left, right = sorted_vals[idx - 1], sorted_vals[idx]
    idx = np.where(np.abs(pcm - left) <= np.abs(pcm - right), idx - 1, idx)
    return order[idx].astype(np.uint8).tobytes()
