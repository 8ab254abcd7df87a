"""Audio preprocessing for VITA's "whale" audio encoder.

Pipeline: decode -> first channel -> 16 kHz float32 (torchaudio's default sinc resampler,
`models.resample`) -> x 2**15 -> Kaldi fbank (80 mel bins, 25 ms window, 10 ms shift, snip_edges)
-> global CMVN with the checkpoint's fixed means/istds.
The encoder subsamples 4x (two stride-2 convs) and the adapter 2x more, so one audio token
covers 80 ms; `audio_token_count` reproduces that arithmetic exactly.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import kaldi_native_fbank as knf
import numpy as np
import soundfile as sf

from models.errors import InvalidAudioError
from models.resample import resample

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
WINDOW_SAMPLES = 400  # 25 ms at 16 kHz
SHIFT_SAMPLES = 160  # 10 ms at 16 kHz

_ACCEPTED = "audio must be WAV, FLAC or OGG (or raw PCM16 with a given rate)"
_PCM16_SCALE = 1.0 / 32768.0


def decode_audio(data: bytes) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG bytes into float32 samples ((frames,) or (frames, channels)) and the rate."""
    if not data:
        raise InvalidAudioError(f"audio is empty (0 bytes); {_ACCEPTED}")
    try:
        wave, rate = sf.read(io.BytesIO(bytes(data)), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
        raise InvalidAudioError(f"{_ACCEPTED}; could not decode: {exc}") from exc
    return np.asarray(wave, dtype=np.float32), int(rate)


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian signed 16-bit PCM bytes -> float32 samples in [-1, 1)."""
    if len(data) % 2:
        raise InvalidAudioError(
            f"raw PCM16 audio must have an even number of bytes (2 per sample); got {len(data)} bytes"
        )
    return np.frombuffer(data, dtype="<i2").astype(np.float32) * np.float32(_PCM16_SCALE)


def _as_float_samples(wave: np.ndarray) -> np.ndarray:
    """Validate dtype/shape and return float32 (frames,) or (frames, channels); int16 is rescaled."""
    wave = np.asarray(wave)
    if wave.ndim not in (1, 2):
        raise InvalidAudioError(
            f"audio array must be (samples,) or (samples, channels); got shape {wave.shape}"
        )
    if wave.dtype == np.int16:
        return wave.astype(np.float32) * np.float32(_PCM16_SCALE)
    if not np.issubdtype(wave.dtype, np.floating):
        raise InvalidAudioError(f"audio array must be float32/float64 in [-1, 1] or int16; got {wave.dtype}")
    return wave.astype(np.float32, copy=False)


def to_mono_16k(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Any rate, mono or (frames, channels) -> 16 kHz mono float32, as VITA prepares a clip.

    Multi-channel audio keeps its FIRST channel: VITA loads with torchaudio ((channels, frames)) and
    torchaudio's kaldi.fbank reads channel max(-1, 0) = 0, so the other channels never reach the model.
    Other rates go through torchaudio's default resampler (`models.resample`, as VITA's
    `transforms.Resample`); no clipping afterwards, as upstream (the fbank takes any float).
    """
    numeric = isinstance(sample_rate, (int, float, np.number)) and not isinstance(sample_rate, bool)
    if not numeric or not math.isfinite(sample_rate) or sample_rate <= 0 or int(sample_rate) != sample_rate:
        raise InvalidAudioError(f"sample rate must be a positive whole number of Hz; got {sample_rate!r}")
    samples = _as_float_samples(wave)
    if samples.shape[0] == 0 or samples.size == 0:
        raise InvalidAudioError("audio is empty (0 samples); send at least 0.1 s of speech")
    if not np.isfinite(samples).all():
        raise InvalidAudioError("audio contains NaN or infinite samples; samples must be finite in [-1, 1]")
    mono = np.ascontiguousarray(samples[:, 0]) if samples.ndim == 2 else samples
    if sample_rate != SAMPLE_RATE:
        mono = resample(mono, int(sample_rate), SAMPLE_RATE)
    return mono.astype(np.float32, copy=False)


def num_fbank_frames(num_samples: int) -> int:
    """Kaldi frame count with snip_edges=True: 1 + (n - 400) // 160, or 0 when shorter than a window."""
    if num_samples < WINDOW_SAMPLES:
        return 0
    return 1 + (num_samples - WINDOW_SAMPLES) // SHIFT_SAMPLES


def audio_token_count(num_frames: int) -> int:
    """LLM tokens the whale encoder + adapter produce for `num_frames` fbank frames (never negative).

    Two Conv2d(k3, s2) give t1 = ((T-1)//2 - 1)//2; the adapter pads 4 and runs Conv1d(k5, s2)
    giving (t1-1)//2 + 1. Python floor division makes t1 <= 0 yield 0, matching a conv that
    would have no valid output.
    """
    t1 = ((num_frames - 1) // 2 - 1) // 2
    return max(0, (t1 - 1) // 2 + 1)


def audio_tokens_for_samples(num_samples: int) -> int:
    """Audio tokens for a 16 kHz clip of `num_samples` samples."""
    return audio_token_count(num_fbank_frames(num_samples))


def _min_samples_for_one_token() -> int:
    """Smallest 16 kHz sample count that yields at least one audio token (1360 = 85 ms)."""
    frames = 1
    while audio_token_count(frames) < 1:
        frames += 1
    return WINDOW_SAMPLES + (frames - 1) * SHIFT_SAMPLES


MIN_SAMPLES = _min_samples_for_one_token()


def _vector(values: Sequence[float], name: str, size: int) -> np.ndarray:
    """A read-only float32 vector of exactly `size` finite values."""
    arr = np.asarray(values, dtype=np.float32).reshape(-1)
    if arr.shape[0] != size:
        raise ValueError(f"{name} must have {size} values (one per mel bin); got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite")
    arr.setflags(write=False)
    return arr


class AudioFeatureExtractor:
    """Kaldi fbank + global CMVN, matching torchaudio.compliance.kaldi.fbank as VITA used it."""

    def __init__(
        self,
        cmvn_means: Sequence[float],
        cmvn_istds: Sequence[float],
        num_mel_bins: int = NUM_MEL_BINS,
        frame_length_ms: float = 25,
        frame_shift_ms: float = 10,
        dither: float = 0.0,
    ) -> None:
        if num_mel_bins < 3:
            raise ValueError(f"num_mel_bins must be at least 3; got {num_mel_bins}")
        self.num_mel_bins = int(num_mel_bins)
        self.frame_length_ms = float(frame_length_ms)
        self.frame_shift_ms = float(frame_shift_ms)
        self.dither = float(dither)
        self.cmvn_means = _vector(cmvn_means, "cmvn_means", self.num_mel_bins)
        self.cmvn_istds = _vector(cmvn_istds, "cmvn_istds", self.num_mel_bins)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AudioFeatureExtractor:
        """Build from a feature_extractor/preprocessor_config.json dict."""
        rate = int(d.get("sampling_rate", SAMPLE_RATE))
        if rate != SAMPLE_RATE:
            raise ValueError(f"feature extractor sampling_rate must be {SAMPLE_RATE}; got {rate}")
        for key in ("cmvn_means", "cmvn_istds"):
            if key not in d:
                raise ValueError(f"feature extractor config is missing {key!r}")
        return cls(
            cmvn_means=d["cmvn_means"],
            cmvn_istds=d["cmvn_istds"],
            num_mel_bins=int(d.get("feature_size", NUM_MEL_BINS)),
            frame_length_ms=float(d.get("frame_length", 25)),
            frame_shift_ms=float(d.get("frame_shift", 10)),
            # Deliberately NOT the config's value. The published feature_extractor/preprocessor_config.json
            # says dither=1.0 (Gaussian noise of std 1 added to every sample of every frame, x 2**15 scale: a
            # training augmentation; upstream's vLLM demo even applies it at inference). Inference here
            # forces 0 so the same audio always gives the same features (and feature caching is valid).
            dither=0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        """The preprocessor_config.json dict that `from_dict` reads back."""
        return {
            "feature_size": self.num_mel_bins,
            "sampling_rate": SAMPLE_RATE,
            "cmvn_means": [float(v) for v in self.cmvn_means],
            "cmvn_istds": [float(v) for v in self.cmvn_istds],
            "frame_length": self.frame_length_ms,
            "frame_shift": self.frame_shift_ms,
            "dither": self.dither,
        }

    def fbank_options(self) -> knf.FbankOptions:
        """knf options equal to torchaudio's kaldi.fbank defaults with VITA's overrides."""
        opts = knf.FbankOptions()
        opts.frame_opts.samp_freq = float(SAMPLE_RATE)
        opts.frame_opts.frame_length_ms = self.frame_length_ms
        opts.frame_opts.frame_shift_ms = self.frame_shift_ms
        opts.frame_opts.dither = self.dither
        opts.frame_opts.snip_edges = True
        opts.frame_opts.preemph_coeff = 0.97
        opts.frame_opts.remove_dc_offset = True
        opts.frame_opts.window_type = "povey"
        opts.mel_opts.num_bins = self.num_mel_bins
        opts.mel_opts.low_freq = 20.0
        opts.mel_opts.high_freq = 0.0
        if hasattr(opts.mel_opts, "is_librosa"):
            opts.mel_opts.is_librosa = False  # Kaldi (HTK-formula) mel banks, as torchaudio uses
        opts.energy_floor = 0.0
        opts.use_energy = False
        opts.use_log_fbank = True
        opts.use_power = True
        return opts

    def __call__(self, wave16k: np.ndarray) -> np.ndarray:
        """16 kHz mono float samples in [-1, 1] -> (T, num_mel_bins) float32 CMVN-normalised fbank."""
        samples = _as_float_samples(wave16k)
        if samples.ndim != 1:
            raise InvalidAudioError(f"feature extraction needs mono 16 kHz audio; got shape {samples.shape}")
        if not np.isfinite(samples).all():
            raise InvalidAudioError(
                "audio contains NaN or infinite samples; samples must be finite in [-1, 1]"
            )
        if samples.shape[0] < MIN_SAMPLES:
            raise InvalidAudioError(
                f"audio is too short: {samples.shape[0]} samples ({samples.shape[0] / SAMPLE_RATE:.3f} s); "
                f"at least {MIN_SAMPLES} samples ({MIN_SAMPLES / SAMPLE_RATE:.3f} s) at 16 kHz are needed"
            )
        feats = kaldi_fbank(samples * np.float32(32768.0), self.fbank_options())
        return ((feats - self.cmvn_means) * self.cmvn_istds).astype(np.float32, copy=False)


def kaldi_fbank(samples: np.ndarray, opts: knf.FbankOptions) -> np.ndarray:
    """Run kaldi-native-fbank over a whole clip -> (T, bins) float32 (T may be 0)."""
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(float(opts.frame_opts.samp_freq), np.ascontiguousarray(samples, dtype=np.float32))
    fbank.input_finished()
    count = fbank.num_frames_ready
    if count == 0:
        return np.zeros((0, opts.mel_opts.num_bins), dtype=np.float32)
    return np.stack([np.asarray(fbank.get_frame(i), dtype=np.float32) for i in range(count)])
