"""The model's audio and video front ends against upstream VITA: torchaudio's default resampler (checked
against a plain transcription of its formula), its streaming form, first-channel selection, and the
frame sampling and resize of VITA's offline video demo."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from models.audio_features import SAMPLE_RATE, AudioFeatureExtractor, kaldi_fbank, to_mono_16k
from models.resample import StreamingResampler, resample, sinc_kernel
from models.video_frames import resized_short_side, sample_frame_indices, square_frame

DATA = Path(__file__).parent / "data"


def torchaudio_resample_reference(x: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """torchaudio.transforms.Resample(orig_rate, new_rate) with its defaults, written out in float64 as a
    direct sum over the windowed sinc (no conv, no padding tricks), from the formula in torchaudio's
    `_get_sinc_resample_kernel` / `_apply_sinc_resample_kernel`.

    Output k = block b = k // new, phase j = k % new, reads input samples b*orig + i for
    i in [-width, width + orig) (zero outside the signal) with weight
    sinc(pi t) * cos(pi t / 12)^2 * base / orig, t = clamp((i / orig - j / new) * base, -6, 6),
    base = 0.99 * min(orig, new); rates divided by their gcd; ceil(new * n / orig) outputs.
    One torchaudio detail is kept: the phase j / new is an int64 tensor divided by an int, i.e. float32,
    before it meets the float64 taps (at 22.05 kHz dropping it moves outputs by ~1e-5).
    """
    lpw, rolloff = 6, 0.99
    g = math.gcd(orig_rate, new_rate)
    orig, new = orig_rate // g, new_rate // g
    base = min(orig, new) * rolloff
    width = math.ceil(lpw * orig / base)
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros(math.ceil(new * len(x) / orig))
    taps = np.arange(-width, width + orig)
    for k in range(out.size):
        b, j = divmod(k, new)
        phase = float(np.float32(-j) / np.float32(new))  # torchaudio: float32
        t = np.clip((taps / orig + phase) * base, -lpw, lpw)
        safe = np.where(t == 0, 1.0, np.pi * t)
        weight = (
            np.where(t == 0, 1.0, np.sin(np.pi * t) / safe) * np.cos(t * np.pi / lpw / 2) ** 2 * base / orig
        )
        pos = b * orig + taps
        inside = (pos >= 0) & (pos < len(x))
        out[k] = np.sum(x[pos[inside]] * weight[inside])
    return out


def _noise(seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("orig_rate", [8000, 22050, 44100, 48000, 24000])
def test_resample_equals_torchaudio_formula(orig_rate: int) -> None:
    x = _noise(0.05, orig_rate)
    got = resample(x, orig_rate, SAMPLE_RATE)
    want = torchaudio_resample_reference(x, orig_rate, SAMPLE_RATE)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    # the edges (zero padding) too
    np.testing.assert_allclose(got[:20], want[:20], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got[-20:], want[-20:], atol=1e-5, rtol=0)


def test_resample_upsampling_and_odd_pairs_equal_formula() -> None:
    for orig_rate, new_rate in [(16000, 24000), (16000, 44100), (11025, 16000)]:
        x = _noise(0.02, orig_rate, seed=orig_rate)
        np.testing.assert_allclose(
            resample(x, orig_rate, new_rate), torchaudio_resample_reference(x, orig_rate, new_rate), atol=1e-5
        )


@pytest.mark.parametrize("orig_rate", [8000, 22050, 44100, 48000, 24000])
def test_application_equals_torchaudios_conv1d(orig_rate: int) -> None:
    """The kernel applied as torchaudio's `_apply_sinc_resample_kernel` does (pad, conv1d with stride orig,
    interleave, cut) gives what our strided matmul gives, on a longer signal than the formula test."""
    import torch

    x = _noise(1.0, orig_rate, seed=5)
    k = sinc_kernel(orig_rate, SAMPLE_RATE)
    padded = torch.nn.functional.pad(torch.from_numpy(x)[None], (k.width, k.width + k.orig))
    conv = torch.nn.functional.conv1d(padded[:, None], k.weights, stride=k.orig)
    want = conv.transpose(1, 2).reshape(1, -1)[0, : math.ceil(k.new * x.size / k.orig)].numpy()
    np.testing.assert_allclose(resample(x, orig_rate, SAMPLE_RATE), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("orig_rate", [8000, 22050, 44100, 48000, 24000])
@pytest.mark.parametrize("length", [1, 2, 3, 147, 441, 1000, 44101])
def test_output_length_is_torchaudios(orig_rate: int, length: int) -> None:
    g = math.gcd(orig_rate, SAMPLE_RATE)
    # torchaudio: torch.ceil(torch.as_tensor(new * length / orig)) over the gcd-reduced rates
    expected = math.ceil((SAMPLE_RATE // g) * length / (orig_rate // g))
    assert resample(np.zeros(length, np.float32), orig_rate, SAMPLE_RATE).shape == (expected,)
    assert sinc_kernel(orig_rate, SAMPLE_RATE).output_length(length) == expected


def test_kernel_shape_and_cache() -> None:
    k = sinc_kernel(24000, 16000)
    assert (k.orig, k.new, k.width) == (3, 2, 10)  # width = ceil(6 * 3 / (2 * 0.99))
    assert tuple(k.weights.shape) == (2, 1, 23) and k.matrix.shape == (23, 2)
    assert sinc_kernel(24000, 16000) is k  # cached per (orig, new) pair
    assert sinc_kernel(48000, 32000) is not k  # same reduced pair, separate entry, same values
    np.testing.assert_array_equal(sinc_kernel(48000, 32000).matrix, k.matrix)
    assert not k.matrix.flags.writeable
    with pytest.raises(ValueError, match="whole number"):
        sinc_kernel(22050.5, 16000)  # type: ignore[arg-type]


def test_resample_batches_rows_and_passes_equal_rates() -> None:
    x = np.stack([_noise(0.03, 44100, 1), _noise(0.03, 44100, 2)])
    both = resample(x, 44100, 16000)
    np.testing.assert_allclose(both[1], resample(x[1], 44100, 16000), atol=1e-6, rtol=0)
    row = x[0]
    assert resample(row, 16000, 16000) is row  # equal rates: untouched, as torchaudio
    with pytest.raises(TypeError, match="float"):
        resample(np.zeros(10, np.int16), 8000, 16000)


@pytest.mark.parametrize("orig_rate", [24000, 8000, 44100, 48000])
def test_streaming_equals_offline(orig_rate: int) -> None:
    x = _noise(2.0, orig_rate, seed=3)
    offline = resample(x, orig_rate, SAMPLE_RATE)
    rng = np.random.default_rng(orig_rate)
    stream = StreamingResampler(orig_rate, SAMPLE_RATE)
    parts, pos = [], 0
    while pos < x.size:
        n = int(rng.choice([0, 1, 7, 160, 480, 2048]))
        parts.append(stream(x[pos : pos + n]))
        pos += n
    parts.append(stream.flush())
    streamed = np.concatenate(parts)
    assert streamed.shape == offline.shape
    np.testing.assert_allclose(streamed, offline, atol=1e-6, rtol=0)
    # flush resets: a second stream through the same object is independent of the first
    again = np.concatenate([stream(x[:4800]), stream.flush()])
    np.testing.assert_allclose(again, resample(x[:4800], orig_rate, SAMPLE_RATE), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("orig_rate", "new_rate"), [(24000, 16000), (8000, 16000), (24000, 8000), (16000, 24000),
                                                    (22050, 16000)])
def test_streaming_in_any_chunks_equals_offline_and_torchaudio(orig_rate: int, new_rate: int) -> None:
    """The server's streams (input to 16 kHz, output from 24 kHz) in steady 20 ms chunks and in any others:
    empty, shorter than a window, not a whole number of blocks or of blocks per row, longer than the
    preallocated buffer, and input that is not float32 or not 1-D, with `flush` mid-way (a new stream)."""
    x = _noise(1.5, orig_rate, seed=orig_rate + new_rate)
    stream = StreamingResampler(orig_rate, new_rate)
    rng = np.random.default_rng(new_rate)
    for trial in range(3):
        parts, pos, chunk = [], 0, orig_rate // 50
        while pos < x.size:
            n = chunk if trial == 0 else int(rng.choice([0, 1, 2, 5, 13, chunk - 1, chunk, chunk + 7, 5000, 9001]))
            piece = x[pos : pos + n]
            if trial == 2 and n % 3 == 1:
                piece = piece.astype(np.float64)[None, :]  # converted as before: to float32, flattened
            parts.append(stream(piece))
            pos += n
        parts.append(stream.flush())
        streamed = np.concatenate(parts)
        offline = resample(x, orig_rate, new_rate)
        assert streamed.dtype == np.float32 and streamed.shape == offline.shape
        np.testing.assert_allclose(streamed, offline, atol=1e-6, rtol=0)
    head = x[:2000]
    got = np.concatenate([stream(head[k : k + 160]) for k in range(0, head.size, 160)] + [stream.flush()])
    want = torchaudio_resample_reference(head, orig_rate, new_rate)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_streaming_delay_and_20ms_chunks() -> None:
    stream = StreamingResampler(24000, 16000)
    assert stream.delay_samples == 13  # width 10 + orig 3: 0.54 ms of lookahead
    x = _noise(0.2, 24000)
    sizes = [stream(x[k : k + 480]).size for k in range(0, x.size, 480)]
    # the first chunk: blocks whose 23 taps fit in 10 zeros + 480 samples; then 480 in -> 320 out each time
    assert sizes[0] == 2 * ((10 + 480 - 23) // 3 + 1) == 312 and all(s == 320 for s in sizes[1:])
    assert sum(sizes) + stream.flush().size == 3200
    assert StreamingResampler(16000, 16000)(x[:5]).tolist() == x[:5].tolist()


def test_server_stream_resampler_is_the_exact_one() -> None:
    from server.resampling import StreamResampler

    x = _noise(0.5, 24000, seed=9)
    codec = StreamResampler(24000, 16000)
    out = np.concatenate([codec(x[k : k + 480]) for k in range(0, x.size, 480)] + [codec.flush()])
    np.testing.assert_allclose(out, resample(x, 24000, 16000), atol=1e-6, rtol=0)
    same = StreamResampler(16000, 16000)
    assert same.delay_samples == 0 and same.flush().size == 0


@pytest.mark.parametrize("orig_rate", [24000, 16000, 8000])
def test_scaled_pcm16_equals_decoded_then_resampled(orig_rate: int) -> None:
    """The server's append path: int16 samples scaled as the resampler takes them in (`scaled`) give exactly
    the samples of `decode` then the resampler, in 20 ms chunks, odd ones and ones past the buffer."""
    from server.resampling import StreamResampler
    from server.wire.audio_codec import PCM16_SCALE, AudioFormat, decode, pcm16_samples

    rng = np.random.default_rng(orig_rate)
    pcm = rng.integers(-32768, 32768, orig_rate * 2, dtype=np.int16).astype("<i2")
    fused, plain = StreamResampler(orig_rate, 16000), StreamResampler(orig_rate, 16000)
    fmt = AudioFormat("pcm16", orig_rate) if orig_rate != 8000 else None
    pos = 0
    for n in [orig_rate // 50] * 5 + [1, 13, 5000, orig_rate // 50, 7]:
        raw = pcm[pos : pos + n].tobytes()
        pos += n
        want = plain(decode(raw, fmt) if fmt else pcm16_samples(raw) * PCM16_SCALE)
        got = fused.scaled(pcm16_samples(raw), PCM16_SCALE)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(fused.flush(), plain.flush())


@pytest.mark.parametrize("orig_rate", [24000, 48000, 8000, 44100, 16000])
def test_pcm16_bytes_give_bit_for_bit_the_scaled_samples(orig_rate: int) -> None:
    """A resampler made for PCM16 bytes (int16 buffer, the scale in the grouped matrix; issue 14) returns exactly
    what `scaled` returns for the same samples: 20 ms chunks, odd sizes (a tail beyond the last whole group),
    empty ones, ones past the buffer, the flush and a second stream. 44.1 kHz (ungrouped) and 16 kHz (equal
    rates) take the float path inside; float samples are refused."""
    from server.wire.audio_codec import PCM16_SCALE, pcm16_samples

    rng = np.random.default_rng(orig_rate)
    pcm = rng.integers(-32768, 32768, orig_rate * 3, dtype=np.int16).astype("<i2")
    fast, plain = StreamingResampler(orig_rate, 16000, pcm16_input=True), StreamingResampler(orig_rate, 16000)
    sizes = ([orig_rate // 50] * 7 + [1, 13, 5000, 7, 2, orig_rate // 25, 0, 4097, 5]) * 2
    sizes += rng.integers(0, 2000, 40).tolist()
    pos = 0
    for n in sizes:
        raw = pcm[pos : pos + n].tobytes()
        pos += n
        got = fast.pcm16(raw)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, plain.scaled(pcm16_samples(raw), PCM16_SCALE))
    np.testing.assert_array_equal(fast.flush(), plain.flush())
    raw = pcm[: orig_rate // 50].tobytes()
    np.testing.assert_array_equal(fast.pcm16(raw), plain.scaled(pcm16_samples(raw), PCM16_SCALE))
    with pytest.raises(TypeError, match="PCM16 bytes"):
        fast(np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="even number of bytes"):
        fast.pcm16(b"\x01\x02\x03")


def test_clip_path_uses_exact_resampler_and_logmel_vs_soxr() -> None:
    import soxr

    speech, rate = sf.read(DATA / "beckett.wav", dtype="float32")
    assert rate == SAMPLE_RATE
    at8k = resample(speech, SAMPLE_RATE, 8000)  # an 8 kHz telephone-band clip
    exact = to_mono_16k(at8k, 8000)
    np.testing.assert_array_equal(exact, resample(at8k, 8000, SAMPLE_RATE))
    old = soxr.resample(at8k, 8000.0, float(SAMPLE_RATE))  # what to_mono_16k did before
    opts = AudioFeatureExtractor([0.0] * 80, [1.0] * 80).fbank_options()
    fb_exact, fb_old = (kaldi_fbank(w * np.float32(32768.0), opts) for w in (exact, old))
    n = min(len(fb_exact), len(fb_old))
    diff = np.abs(fb_exact[:n] - fb_old[:n])
    low = diff[:, :56]  # mel bins below ~3.9 kHz, where an 8 kHz clip has content
    print(
        f"\nlog-mel |soxr - exact| at 8 kHz input: max {diff.max():.2f}, mean {diff.mean():.3f}; "
        f"bins below 3.9 kHz: max {low.max():.3f}, mean {low.mean():.4f}"
    )
    assert diff.max() > 0.5  # the two resamplers really differ (the empty 4-8 kHz band above all)


def test_first_channel_reaches_the_model() -> None:
    left, right = _noise(0.2, 22050, 1), _noise(0.2, 22050, 2)
    stereo = np.stack([left, right], axis=1)
    np.testing.assert_array_equal(to_mono_16k(stereo, 22050), to_mono_16k(left, 22050))
    np.testing.assert_array_equal(to_mono_16k(stereo[: 16000 // 5 * 1], 16000), left[:3200])
    six = np.stack([left] + [right] * 5, axis=1)  # 5.1: still the first channel, not a mix
    np.testing.assert_array_equal(to_mono_16k(six, 22050), to_mono_16k(left, 22050))


def test_no_clipping_after_resampling() -> None:
    square = np.tile(np.r_[np.ones(20), -np.ones(20)], 50).astype(np.float32)
    out = to_mono_16k(square, 8000)
    assert np.abs(out).max() > 1.0  # Gibbs overshoot kept, as torchaudio (the fbank takes any float)
    np.testing.assert_array_equal(out, resample(square, 8000, 16000))


# ---------------------------------------------------------------- video (video_audio_demo._get_rawvideo_dec)


@pytest.mark.parametrize(
    ("n_frames", "fps", "expected"),
    [
        (60, 30.0, [0, 0, 0, 30]),  # 2 s: positions [0, 30], linspace(0, 1, 4, int) repeats the first
        (1000, 25.0, [0, 50, 125, 175, 250, 325, 375, 450, 500, 575, 650, 700, 775, 825, 900, 975]),  # 40 s
        (240, 24.0, [0, 24, 48, 72, 96, 120, 144, 168, 192, 216]),  # 10 s: every position, 10 frames
        (120, 29.97, [0, 30, 60, 90]),  # stride round(29.97) = 30
        (100, 12.5, [0, 12, 24, 36, 48, 60, 72, 84, 96]),  # stride round(12.5) = 12 (half to even)
        (75, 25.0, [0, 0, 25, 50]),  # 3 s: positions [0, 25, 50], linspace(0, 2, 4, int) = [0, 0, 1, 2]
        (1, 30.0, [0, 0, 0, 0]),  # a single frame, four times
        (17 * 30, 30.0, [30 * k for k in (*range(15), 16)]),  # 17 positions -> 16: linspace drops the 16th
    ],
)
def test_video_frame_indices(n_frames: int, fps: float, expected: list[int]) -> None:
    assert sample_frame_indices(n_frames, fps) == expected


def test_video_frame_indices_match_a_plain_statement_of_upstream() -> None:
    def upstream(n: int, fps: float) -> list[int]:
        stride = round(float(fps) / 1)  # upstream: int(round(float(fps) / sample_fps))
        pos = list(range(0, n - 1 + 1, stride))
        if len(pos) > 16:
            return [pos[i] for i in np.linspace(0, len(pos) - 1, num=16, dtype=int)]
        if len(pos) < 4:
            return [pos[i] for i in np.linspace(0, len(pos) - 1, num=4, dtype=int)]
        return pos

    for n in (1, 2, 5, 29, 30, 31, 59, 61, 119, 121, 480, 481, 500, 2000, 9001):
        for fps in (1.0, 5.0, 10.0, 15.0, 23.976, 24.0, 25.0, 29.97, 30.0, 50.0, 59.94, 60.0):
            assert sample_frame_indices(n, fps) == upstream(n, fps), (n, fps)


def test_video_frames_repeat_when_decoded(tmp_path: Path) -> None:
    import cv2

    from models.video_frames import decode_video_frames

    path = tmp_path / "two_seconds.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), 10, (64, 48))
    for k in range(20):
        writer.write(np.full((48, 64, 3), 10 * k, np.uint8))
    writer.release()
    frames = decode_video_frames(path.read_bytes())
    levels = [int(np.asarray(f)[5, 5, 1]) for f in frames]
    assert len(frames) == 4 and [round(v / 10) for v in levels] == [0, 0, 0, 10]  # frames 0, 0, 0, 10


@pytest.mark.parametrize(("size", "resized"), [((640, 479), (598, 448)), ((479, 640), (448, 598))])
def test_short_side_resize_truncates_like_transformers(
    size: tuple[int, int], resized: tuple[int, int]
) -> None:
    w, h = size
    assert round(448 * max(w, h) / min(w, h)) == 599  # round would give 599: this case tells them apart
    assert resized_short_side(w, h, 448) == resized
    try:
        from transformers.image_transforms import get_resize_output_image_size
    except ImportError:  # pragma: no cover - transformers comes with vLLM
        pass
    else:
        out_h, out_w = get_resize_output_image_size(
            np.zeros((h, w, 3), np.uint8), 448, default_to_square=False
        )
        assert (out_w, out_h) == resized
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    tile = square_frame(image, 448)
    rw, rh = resized
    left, top = (rw - 448) // 2, (rh - 448) // 2  # transformers' center_crop offsets
    manual = image.resize((rw, rh), Image.Resampling.BICUBIC).crop((left, top, left + 448, top + 448))
    assert tile.size == (448, 448)
    np.testing.assert_array_equal(np.asarray(tile), np.asarray(manual))


@pytest.mark.parametrize("rates", [(24000, 16000), (8000, 16000), (48000, 16000), (44100, 16000), (22050, 16000),
                                   (16000, 16000)])
def test_would_emit_counts_what_the_next_chunks_return(rates: tuple[int, int]) -> None:
    """`would_emit(n)` (the realtime path holds audio back by it, issue 14) is the output of the next n input
    samples, whether they come as one chunk or several, short or past the preallocated buffer."""
    rng = np.random.default_rng(sum(rates))
    stream = StreamingResampler(*rates)
    for _ in range(200):
        sizes = [int(n) for n in rng.integers(0, 2000, size=int(rng.integers(1, 4)))]
        if rng.random() < 0.05:
            sizes.append(6000)
        promised = stream.would_emit(sum(sizes))
        got = sum(stream(rng.standard_normal(n).astype(np.float32)).size for n in sizes)
        assert got == promised, (sizes, got, promised)


@pytest.mark.parametrize("rates", [(24000, 16000), (8000, 16000), (48000, 16000), (44100, 16000), (16000, 16000)])
def test_inputs_below_is_the_most_input_that_stays_below(rates: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(rates) + 1)
    stream = StreamingResampler(*rates)
    for _ in range(200):
        out = int(rng.integers(1, 1200))
        m = stream.inputs_below(out)
        assert stream.would_emit(max(m, 0)) < out <= stream.would_emit(m + 1)
        stream(rng.standard_normal(int(rng.integers(0, 900))).astype(np.float32))
