"""Tests for the media preprocessing modules: audio features, image tiling, video frames."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import kaldi_native_fbank as knf
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from models.audio_features import (
    MIN_SAMPLES,
    SAMPLE_RATE,
    AudioFeatureExtractor,
    audio_token_count,
    audio_tokens_for_samples,
    decode_audio,
    num_fbank_frames,
    pcm16_to_float,
    to_mono_16k,
)
from models.errors import InvalidAudioError, InvalidImageError, InvalidMediaError, InvalidVideoError
from models.image_tiling import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    as_image,
    closest_aspect_ratio,
    decode_image,
    dynamic_tiles,
    image_to_pixel_values,
    normalize_tiles,
    num_tiles_for,
    target_ratios,
    tokens_per_tile,
)
from models.video_frames import (
    decode_video_frames,
    frames_to_pixel_values,
    sample_frame_indices,
    select_live_frames,
)

RNG_SEED = 1234


def _extractor(bins: int = 80) -> AudioFeatureExtractor:
    rng = np.random.default_rng(RNG_SEED)
    return AudioFeatureExtractor(rng.normal(10, 2, bins).tolist(), rng.uniform(0.2, 0.5, bins).tolist())


def _speechlike(seconds: float, rate: int = SAMPLE_RATE) -> np.ndarray:
    rng = np.random.default_rng(RNG_SEED)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


# ---------------------------------------------------------------- audio token arithmetic


@pytest.mark.parametrize(
    ("seconds", "tokens"),
    [(1.5, 18), (10.0, 124), (1.0, 12), (0.5, 6), (2.0, 24)],
)
def test_audio_tokens_for_durations(seconds: float, tokens: int) -> None:
    assert audio_tokens_for_samples(int(seconds * SAMPLE_RATE)) == tokens


@pytest.mark.parametrize("frames", [0, 1, 3, 7, 8, 15, 100, 148, 998, 8192])
def test_audio_token_count_formula(frames: int) -> None:
    t1 = ((frames - 1) // 2 - 1) // 2
    assert audio_token_count(frames) == max(0, (t1 - 1) // 2 + 1)


def test_audio_token_count_never_negative_and_minimum() -> None:
    assert all(audio_token_count(t) == 0 for t in range(-5, 7))
    assert audio_token_count(7) == 1
    assert MIN_SAMPLES == 400 + 6 * 160
    assert audio_tokens_for_samples(MIN_SAMPLES) == 1
    assert audio_tokens_for_samples(MIN_SAMPLES - 1) == 0


def test_num_fbank_frames() -> None:
    assert num_fbank_frames(0) == 0
    assert num_fbank_frames(399) == 0
    assert num_fbank_frames(400) == 1
    assert num_fbank_frames(559) == 1
    assert num_fbank_frames(560) == 2
    assert num_fbank_frames(16000) == 98


# ---------------------------------------------------------------- fbank features


def _direct_knf(wave: np.ndarray) -> np.ndarray:
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True
    opts.mel_opts.num_bins = 80
    opts.energy_floor = 0.0
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, (wave * 32768.0).astype(np.float32))
    fb.input_finished()
    return np.stack([np.asarray(fb.get_frame(i)) for i in range(fb.num_frames_ready)])


def _numpy_kaldi_fbank(wave: np.ndarray) -> np.ndarray:
    """Independent re-statement of torchaudio.compliance.kaldi.fbank defaults (80 bins, no dither)."""
    x = wave.astype(np.float64) * 32768.0
    n = 1 + (x.size - 400) // 160
    frames = np.stack([x[i * 160 : i * 160 + 400] for i in range(n)])
    frames -= frames.mean(axis=1, keepdims=True)
    frames = np.concatenate([frames[:, :1] * (1 - 0.97), frames[:, 1:] - 0.97 * frames[:, :-1]], axis=1)
    frames *= (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    power = np.abs(np.fft.rfft(frames, n=512)) ** 2

    def mel(f: np.ndarray | float) -> np.ndarray:
        return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)

    lo, hi = mel(20.0), mel(8000.0)
    delta = (hi - lo) / 81
    fft_mel = mel(np.arange(256) * 16000 / 512)
    banks = np.zeros((80, 257))
    for b in range(80):
        left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        up = (fft_mel - left) / (center - left)
        down = (right - fft_mel) / (right - center)
        banks[b, :256] = np.maximum(0.0, np.minimum(up, down))
    return np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps))


def test_fbank_matches_direct_knf_with_cmvn() -> None:
    ext = _extractor()
    wave = _speechlike(1.5)
    feats = ext(wave)
    assert feats.shape == (num_fbank_frames(wave.size), 80)
    assert feats.dtype == np.float32
    expected = (_direct_knf(wave) - ext.cmvn_means) * ext.cmvn_istds
    np.testing.assert_allclose(feats, expected, rtol=1e-5, atol=1e-5)


def test_fbank_matches_kaldi_reference_definition() -> None:
    ext = AudioFeatureExtractor([0.0] * 80, [1.0] * 80)
    wave = _speechlike(0.5)
    np.testing.assert_allclose(ext(wave), _numpy_kaldi_fbank(wave), atol=2e-3, rtol=1e-4)


def test_feature_extractor_dict_round_trip_forces_dither_zero() -> None:
    ext = _extractor()
    d = ext.to_dict()
    assert set(d) == {
        "feature_size",
        "sampling_rate",
        "cmvn_means",
        "cmvn_istds",
        "frame_length",
        "frame_shift",
        "dither",
    }
    assert d["feature_size"] == 80 and d["sampling_rate"] == 16000 and d["dither"] == 0.0
    back = AudioFeatureExtractor.from_dict({**d, "dither": 1.0})
    assert back.dither == 0.0
    np.testing.assert_array_equal(back.cmvn_means, ext.cmvn_means)
    wave = _speechlike(0.3)
    np.testing.assert_array_equal(back(wave), ext(wave))  # deterministic: no dither noise


def test_feature_extractor_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="80 values"):
        AudioFeatureExtractor([0.0] * 79, [1.0] * 80)
    with pytest.raises(ValueError, match="sampling_rate"):
        AudioFeatureExtractor.from_dict({**_extractor().to_dict(), "sampling_rate": 8000})


def test_feature_extractor_rejects_too_short_audio() -> None:
    ext = _extractor()
    assert ext(np.zeros(MIN_SAMPLES, dtype=np.float32)).shape == (7, 80)
    with pytest.raises(InvalidAudioError, match=r"too short.*1360 samples"):
        ext(np.zeros(MIN_SAMPLES - 1, dtype=np.float32))


# ---------------------------------------------------------------- decoding and resampling


@pytest.mark.parametrize("rate", [24000, 44100, 8000])
def test_resample_stereo_to_16k_mono(rate: int) -> None:
    n = int(1.3 * rate)
    mono = _speechlike(1.3, rate)[:n]
    stereo = np.stack([mono, 0.5 * mono], axis=1)
    out = to_mono_16k(stereo, rate)
    assert out.dtype == np.float32 and out.ndim == 1
    assert abs(out.size - n * SAMPLE_RATE / rate) <= 1
    assert np.abs(out).max() <= 1.0


def test_to_mono_16k_int16_and_passthrough() -> None:
    pcm = np.array([0, 16384, -32768, 32767], dtype=np.int16)
    np.testing.assert_allclose(to_mono_16k(pcm, 16000), [0.0, 0.5, -1.0, 32767 / 32768])
    wave = _speechlike(0.2)
    np.testing.assert_array_equal(to_mono_16k(wave, 16000), wave)


def test_decode_audio_wav_and_flac() -> None:
    wave = _speechlike(0.25, 22050)
    for fmt in ("WAV", "FLAC"):
        buf = io.BytesIO()
        sf.write(buf, np.stack([wave, wave], axis=1), 22050, format=fmt, subtype="PCM_16")
        decoded, rate = decode_audio(buf.getvalue())
        assert rate == 22050 and decoded.shape == (wave.size, 2) and decoded.dtype == np.float32
        np.testing.assert_allclose(decoded[:, 0], wave, atol=1 / 16384)


def test_pcm16_to_float() -> None:
    data = np.array([0, 16384, -32768], dtype="<i2").tobytes()
    np.testing.assert_array_equal(pcm16_to_float(data), np.array([0.0, 0.5, -1.0], dtype=np.float32))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: to_mono_16k(np.zeros(0, dtype=np.float32), 16000), "audio is empty"),
        (lambda: to_mono_16k(np.array([0.0, np.nan], dtype=np.float32), 16000), "NaN or infinite"),
        (lambda: to_mono_16k(np.array([0.0, np.inf]), 16000), "NaN or infinite"),
        (lambda: to_mono_16k(np.zeros(100, dtype=np.float32), 0), "sample rate"),
        (lambda: to_mono_16k(np.zeros(100, dtype=np.int32), 16000), "int16"),
        (lambda: pcm16_to_float(b"\x00\x01\x02"), "even number of bytes"),
        (lambda: decode_audio(b""), "WAV, FLAC or OGG"),
        (lambda: decode_audio(b"RIFF\x00\x00garbage-not-a-wave" * 4), "WAV, FLAC or OGG"),
        (lambda: decode_audio(np.random.default_rng(0).bytes(2048)), "could not decode"),
    ],
)
def test_bad_audio_raises(call, match: str) -> None:
    with pytest.raises(InvalidAudioError, match=match) as info:
        call()
    assert isinstance(info.value, (InvalidMediaError, ValueError))


# ---------------------------------------------------------------- image tiling


def _image(width: int, height: int, color: tuple[int, int, int] = (10, 120, 250)) -> Image.Image:
    return Image.new("RGB", (width, height), color)


def test_target_ratios_order() -> None:
    ratios = target_ratios(1, 12)
    products = [i * j for i, j in ratios]
    assert products == sorted(products)
    assert ratios[0] == (1, 1) and len(ratios) == len(set(ratios))
    assert set(ratios) == {(i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12}
    assert target_ratios(1, 1) == [(1, 1)]


def test_closest_aspect_ratio_tie_prefers_larger_grid_only_for_large_images() -> None:
    ratios = target_ratios(1, 12)
    assert closest_aspect_ratio(1.0, ratios, 448, 448, 448) == (1, 1)
    assert closest_aspect_ratio(1.0, ratios, 896, 896, 448) == (2, 2)


@pytest.mark.parametrize(
    ("size", "max_num", "grid", "count"),
    [
        ((448, 448), 12, (1, 1), 1),
        ((896, 448), 12, (2, 1), 3),
        ((1344, 448), 12, (3, 1), 4),
        ((448, 1344), 12, (1, 3), 4),
        ((1000, 300), 12, (3, 1), 4),
        ((896, 896), 12, (2, 2), 5),
        ((1920, 1080), 12, (4, 2), 9),
        ((1000, 300), 1, (1, 1), 1),
        ((4000, 100), 6, (6, 1), 7),
    ],
)
def test_dynamic_tiles_grids(size: tuple[int, int], max_num: int, grid: tuple[int, int], count: int) -> None:
    tiles = dynamic_tiles(_image(*size), max_num=max_num)
    assert len(tiles) == count == num_tiles_for(*size, max_dynamic_patch=max_num)
    assert all(t.size == (448, 448) and t.mode == "RGB" for t in tiles)
    cols, rows = grid
    assert len(tiles) == cols * rows + (1 if cols * rows > 1 else 0)


def test_tiles_are_row_major_crops_of_resized_image() -> None:
    # Left half red, right half blue, wide 2:1 -> two tiles: red then blue.
    arr = np.zeros((448, 896, 3), dtype=np.uint8)
    arr[:, :448] = (255, 0, 0)
    arr[:, 448:] = (0, 0, 255)
    tiles = dynamic_tiles(as_image(arr))
    assert np.asarray(tiles[0])[224, 100].tolist() == [255, 0, 0]
    assert np.asarray(tiles[1])[224, 300].tolist() == [0, 0, 255]
    # Tall: top green, bottom white -> first tile green.
    tall = np.full((1344, 448, 3), 255, dtype=np.uint8)
    tall[:448] = (0, 255, 0)
    assert np.asarray(dynamic_tiles(as_image(tall))[0])[200, 200].tolist() == [0, 255, 0]


def test_no_thumbnail_when_disabled() -> None:
    assert len(dynamic_tiles(_image(896, 448), use_thumbnail=False)) == 2
    assert num_tiles_for(896, 448, use_thumbnail=False) == 2


def test_normalize_constant_colour() -> None:
    color = (10, 120, 250)
    pixels = image_to_pixel_values(_image(300, 200, color), max_dynamic_patch=1)
    assert pixels.shape == (1, 3, 448, 448) and pixels.dtype == np.float32
    for c in range(3):
        expected = (color[c] / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        np.testing.assert_allclose(pixels[0, c], expected, atol=1e-5)


def test_normalize_tiles_rejects_wrong_size() -> None:
    with pytest.raises(ValueError, match="expected 448x448"):
        normalize_tiles([_image(10, 10)], 448)


def test_tokens_per_tile() -> None:
    assert tokens_per_tile() == 256
    assert tokens_per_tile(224, 14, 0.5) == 64


def test_decode_image_formats_and_modes() -> None:
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP"):
        buf = io.BytesIO()
        _image(20, 10).save(buf, format=fmt)
        img = decode_image(buf.getvalue())
        assert img.mode == "RGB" and img.size == (20, 10)
    buf = io.BytesIO()
    Image.new("RGBA", (5, 5), (1, 2, 3, 0)).save(buf, format="PNG")
    assert decode_image(buf.getvalue()).mode == "RGB"
    assert as_image(Image.new("L", (3, 3))).mode == "RGB"


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    _image(64, 64).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: decode_image(b""), "empty"),
        (lambda: decode_image(_png_bytes()[:60]), "corrupt or truncated"),
        (lambda: decode_image(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj"), "JPEG, PNG, WEBP, GIF or BMP"),
        (lambda: decode_image(np.random.default_rng(0).bytes(512)), "unsupported image format"),
        (lambda: as_image(np.zeros((0, 5, 3), dtype=np.uint8)), "zero size"),
        (lambda: as_image(np.zeros((4, 4), dtype=np.uint8)), "HxWx3 uint8"),
        (lambda: as_image(Image.new("RGB", (0, 0))), "zero size"),
        (lambda: as_image("not an image"), "unsupported image object"),
        (lambda: num_tiles_for(0, 10), "zero size"),
    ],
)
def test_bad_images_raise(call, match: str) -> None:
    with pytest.raises(InvalidImageError, match=match):
        call()


def test_decode_image_tiff_is_unsupported() -> None:
    buf = io.BytesIO()
    _image(8, 8).save(buf, format="TIFF")
    with pytest.raises(InvalidImageError, match="JPEG, PNG, WEBP, GIF or BMP"):
        decode_image(buf.getvalue())


# ---------------------------------------------------------------- video


def _write_mp4(path: Path, seconds: float, fps: int = 10) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (64, 48))
    assert writer.isOpened()
    for k in range(int(seconds * fps)):
        frame = np.zeros((48, 64, 3), dtype=np.uint8)
        frame[:, :, 2] = 200  # BGR red channel
        frame[:, :, 1] = k % 256
        writer.write(frame)
    writer.release()
    return path


@pytest.mark.parametrize(("seconds", "expected"), [(5, 5), (2, 4), (30, 16)])
def test_decode_video_frame_counts(tmp_path: Path, seconds: float, expected: int) -> None:
    path = _write_mp4(tmp_path / "clip.mp4", seconds)
    frames = decode_video_frames(path)
    assert len(frames) == expected
    assert all(f.size == (64, 48) and f.mode == "RGB" for f in frames)
    red, _, blue = np.asarray(frames[0])[10, 10].tolist()
    assert red > 150 and blue < 60  # BGR was converted to RGB


def test_decode_video_from_bytes_and_sampled_indices(tmp_path: Path) -> None:
    data = _write_mp4(tmp_path / "clip.mp4", 5).read_bytes()
    frames = decode_video_frames(data)
    greens = [int(np.asarray(f)[5, 5, 1]) for f in frames]
    assert [round(g / 10) for g in greens] == [0, 1, 2, 3, 4]  # frames 0, 10, 20, 30, 40
    assert not list(Path(tmp_path).glob("vita-video-*"))


def test_sample_frame_indices() -> None:
    assert sample_frame_indices(50, 10.0) == [0, 10, 20, 30, 40]
    assert sample_frame_indices(20, 10.0) == [0, 0, 0, 10]  # VITA repeats frames of clips under 4 s
    assert sample_frame_indices(3, 10.0) == [0, 0, 0, 0]
    assert len(sample_frame_indices(300, 10.0)) == 16
    assert sample_frame_indices(10, 0.0, max_frames=4) == [0, 3, 6, 9]
    assert sample_frame_indices(60, 30.0, fps=2.0) == [0, 15, 30, 45]


def test_video_tempfile_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    decode_video_frames(_write_mp4(tmp_path / "a.mp4", 1).read_bytes())
    with pytest.raises(InvalidVideoError):
        decode_video_frames(b"not a video at all" * 100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]


@pytest.mark.parametrize(
    "data",
    [b"", b"not a video at all" * 100, b"\x00\x00\x00\x18ftypmp42" + bytes(200)],
)
def test_bad_video_raises(data: bytes) -> None:
    with pytest.raises(InvalidVideoError, match="MP4, WEBM, AVI or MKV|empty"):
        decode_video_frames(data)


def test_missing_video_path_raises(tmp_path: Path) -> None:
    with pytest.raises(InvalidVideoError, match="not found"):
        decode_video_frames(tmp_path / "missing.mp4")


def test_select_live_frames() -> None:
    frames = [(t / 2, f"f{t}") for t in range(20)]  # 2 fps, t = 0.0 .. 9.5
    assert select_live_frames(frames, now=9.5) == ["f15", "f16", "f17", "f19"]
    assert select_live_frames(frames, now=9.5, window_s=1.0) == ["f17", "f18", "f19"]
    assert select_live_frames(frames, now=100.0) == []
    assert select_live_frames(list(reversed(frames)), now=9.5, window_s=0.6) == ["f18", "f19"]
    assert select_live_frames(frames, now=5.0, max_frames=2) == ["f6", "f10"]
    with pytest.raises(ValueError):
        select_live_frames(frames, now=1.0, max_frames=0)


def test_frames_to_pixel_values() -> None:
    frames = [_image(64, 48, (255, 0, 0)), np.zeros((30, 40, 3), dtype=np.uint8)]
    pixels = frames_to_pixel_values(frames)
    assert pixels.shape == (2, 3, 448, 448) and pixels.dtype == np.float32
    np.testing.assert_allclose(pixels[0, 0], (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], atol=1e-5)
    np.testing.assert_allclose(pixels[1, 2], -IMAGENET_MEAN[2] / IMAGENET_STD[2], atol=1e-5)
    with pytest.raises(InvalidVideoError):
        frames_to_pixel_values([])


def test_feature_cache_returns_the_extractors_features_once_per_clip_and_stays_bounded() -> None:
    from models.feature_cache import FeatureCache

    rng = np.random.default_rng(7)
    extractor = AudioFeatureExtractor(rng.normal(size=80), rng.uniform(0.5, 2.0, size=80))
    other = AudioFeatureExtractor(rng.normal(size=80), rng.uniform(0.5, 2.0, size=80))
    clips = [rng.normal(0, 0.1, 16000).astype(np.float32) for _ in range(3)]
    cache = FeatureCache(max_bytes=2 * extractor(clips[0]).nbytes)  # room for two clips' features
    first = cache.features(extractor, clips[0])
    np.testing.assert_array_equal(first, extractor(clips[0]))
    assert cache.features(extractor, clips[0].copy()) is first  # same samples, another array: a hit
    assert (cache.hits, cache.misses) == (1, 1)
    # Another extractor (other CMVN) on the same samples is another entry with its own features.
    np.testing.assert_array_equal(cache.features(other, clips[0]), other(clips[0]))
    assert cache.misses == 2
    cache.features(extractor, clips[1])  # a third entry evicts the least recently used
    assert len(cache) == 2
    assert cache.features(extractor, clips[0]) is not first
    with pytest.raises(ValueError):
        first[0, 0] = 1.0  # shared between requests: read-only
