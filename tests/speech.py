"""Test speech: espeak-ng utterances mixed with silence and noise, with ground-truth speech intervals.

Ground truth comes from the clean speech signal: an utterance spans from its first to its last sample
above `TRUTH_THRESHOLD` in amplitude (espeak pads its output with silence, which is not speech).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

from duplex.tts import EspeakTTS, resample

SAMPLE_RATE = 16_000
TRUTH_THRESHOLD = 0.01
DATA = Path(__file__).parent / "data"

Silence = tuple[str, float]  # ("silence", seconds)
Speech = tuple[str, str]  # ("speech", text)
Noise = tuple[str, float, float]  # ("noise", seconds, rms level)
Part = Silence | Speech | Noise


def espeak_speech(text: str, sample_rate: int = SAMPLE_RATE, voice: str = "en-us") -> np.ndarray:
    """``text`` spoken by espeak-ng, float32 mono at ``sample_rate``."""
    tts = EspeakTTS(voice=voice)
    return resample(tts.synthesize_blocking(text), tts.sample_rate, sample_rate)


def speech_span(audio: np.ndarray, threshold: float = TRUTH_THRESHOLD) -> tuple[int, int] | None:
    """[first, last + 1) of the samples above ``threshold``, or None if there are none."""
    loud = np.flatnonzero(np.abs(audio) > threshold)
    if loud.size == 0:
        return None
    return int(loud[0]), int(loud[-1]) + 1


def compose(
    parts: list[Part],
    sample_rate: int = SAMPLE_RATE,
    noise_rms: float = 0.0,
    seed: int = 0,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Concatenate parts; add white noise of ``noise_rms`` over everything (seeded).

    Returns the audio and one truth interval [start, end) in samples per speech part.
    """
    rng = np.random.default_rng(seed)
    pieces: list[np.ndarray] = []
    truth: list[tuple[int, int]] = []
    offset = 0
    for part in parts:
        kind = part[0]
        if kind == "silence":
            piece = np.zeros(round(float(part[1]) * sample_rate), np.float32)
        elif kind == "noise":
            n = round(float(part[1]) * sample_rate)
            piece = (rng.standard_normal(n) * float(part[2])).astype(np.float32)
        elif kind == "speech":
            piece = espeak_speech(str(part[1]), sample_rate)
            span = speech_span(piece)
            if span is not None:
                truth.append((offset + span[0], offset + span[1]))
        else:
            raise ValueError(f"unknown part {part!r}")
        pieces.append(piece)
        offset += piece.size
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if noise_rms > 0:
        audio = audio + (rng.standard_normal(audio.size) * noise_rms).astype(np.float32)
    return audio.astype(np.float32), truth


def load_beckett() -> np.ndarray:
    """tests/data/beckett.wav: 16 kHz mono, 9.96 s, six short phrases (see tests/data/README.md)."""
    audio, rate = sf.read(DATA / "beckett.wav", dtype="float32", always_2d=False)
    if rate != SAMPLE_RATE or audio.ndim != 1:
        raise ValueError(f"beckett.wav: expected 16 kHz mono, got {rate} Hz shape {audio.shape}")
    return audio
