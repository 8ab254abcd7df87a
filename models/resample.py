"""Band-limited resampling equal to torchaudio's default, without torchaudio.

VITA resamples every clip that is not 16 kHz with `torchaudio.transforms.Resample(orig, new)` before the
Kaldi fbank (whale `audioEncoderProcessor.process`, and the vLLM demo's `WhaleFeatureExtractor`). The
defaults are a Hann-windowed sinc (`sinc_interp_hann`), 6 zero crossings (`lowpass_filter_width`), cut-off
at 0.99 of the lower Nyquist (`rolloff`). torchaudio's wheels are CUDA builds that break beside the CPU
torch this project installs, so the method is re-implemented here from its definition:

* both rates are divided by their gcd: ``orig``, ``new``;
* ``base = min(orig, new) * rolloff``; ``width = ceil(lowpass_filter_width * orig / base)``;
* for every output phase ``j`` in ``0..new-1`` and tap ``i`` in ``-width .. width+orig-1``:
  ``t = (i / orig - j / new) * base`` clamped to ``[-lpw, lpw]``,
  ``k[j, i] = sinc(pi t) * cos(pi t / (2 lpw))**2 * base / orig`` (``sinc(0) = 1``),
  computed in float64 and stored as float32 (as `transforms.Resample`, whose kernel dtype is None);
* the signal is zero-padded by ``width`` on the left and ``width + orig`` on the right, convolved with
  stride ``orig`` (output ``b * new + j`` is block ``b``, phase ``j``) and cut to ``ceil(new * len / orig)``.

The kernel is computed with torch exactly as torchaudio computes it; applying it is a float32 matmul over
the strided windows torchaudio's conv1d would see (see `_apply`). `resample` is the offline form;
`StreamingResampler` computes the same blocks chunk by chunk, holding back the ``width + orig`` input
samples a block needs to its right, so the concatenation of its outputs and `flush` equals `resample` of
the whole stream (to float32 rounding: the same windows, summed by BLAS in possibly different groupings).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99


@dataclass(frozen=True, eq=False)
class SincKernel:
    """The resampling filter for one (orig, new) pair; rates are already divided by their gcd."""

    orig: int
    new: int
    width: int
    weights: torch.Tensor  # (new, 1, 2 * width + orig) float32: conv1d weights, phase j in row j
    matrix: np.ndarray  # (2 * width + orig, new) float32, read-only: the same weights for a matmul

    @property
    def taps(self) -> int:
        return 2 * self.width + self.orig

    def output_length(self, num_samples: int) -> int:
        """Output samples for `num_samples` input samples: ceil(new * n / orig), as torchaudio."""
        return math.ceil(self.new * num_samples / self.orig)


def _check_rates(orig_rate: int, new_rate: int) -> None:
    for name, rate in (("orig_rate", orig_rate), ("new_rate", new_rate)):
        if isinstance(rate, bool) or int(rate) != rate or rate <= 0:
            raise ValueError(f"{name} must be a positive whole number of Hz; got {rate!r}")


@lru_cache(maxsize=16)  # a server sees a few rates; each odd one may cost MBs (server/limits.py bounds it)
def sinc_kernel(orig_rate: int, new_rate: int) -> SincKernel:
    """The (cached, immutable) kernel for resampling orig_rate -> new_rate Hz. Do not modify its tensors."""
    import torch  # here, not at the top: importing models.audio_features (CLI, client) stays light

    _check_rates(orig_rate, new_rate)
    gcd = math.gcd(int(orig_rate), int(new_rate))
    orig, new = int(orig_rate) // gcd, int(new_rate) // gcd
    base = min(orig, new) * ROLLOFF
    width = math.ceil(LOWPASS_FILTER_WIDTH * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    # torchaudio builds the phase offsets as an int64 arange divided by `new`, which gives float32 before
    # it meets the float64 taps; do the same so the kernel matches transforms.Resample to the last bit.
    phase = torch.arange(0, -new, -1)[:, None, None] / new
    t = (phase.to(torch.float32).to(torch.float64) + idx) * base
    t = t.clamp(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t = t * math.pi
    sinc = torch.where(t == 0, torch.ones((), dtype=torch.float64), torch.sin(t) / t)
    weights = (sinc * (window * (base / orig))).to(torch.float32).contiguous()  # torchaudio's grouping
    matrix = np.ascontiguousarray(weights[:, 0, :].numpy().T)
    matrix.setflags(write=False)
    return SincKernel(orig=orig, new=new, width=width, weights=weights, matrix=matrix)


def resample(wave: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample float samples along the last axis; equal to torchaudio's `Resample(orig, new)` defaults.

    Returns float32 of shape (..., ceil(new * n / orig)) (the input itself, as float32, when the rates
    are equal). No clipping: like torchaudio, the band-limited result may overshoot full scale slightly.
    """
    samples = np.asarray(wave)
    if not np.issubdtype(samples.dtype, np.floating):
        raise TypeError(f"resample needs float samples; got {samples.dtype}")
    _check_rates(orig_rate, new_rate)
    if orig_rate == new_rate:
        return samples.astype(np.float32, copy=False)
    kernel = sinc_kernel(int(orig_rate), int(new_rate))
    length = samples.shape[-1]
    if length == 0 or samples.size == 0:
        return np.zeros((*samples.shape[:-1], 0), dtype=np.float32)
    rows = samples.reshape(-1, length).astype(np.float32, copy=False)
    left = np.zeros(kernel.width, dtype=np.float32)
    right = np.zeros(kernel.width + kernel.orig, dtype=np.float32)
    out = np.stack([_apply(kernel, np.concatenate((left, row, right))) for row in rows])
    return out[:, : kernel.output_length(length)].reshape(*samples.shape[:-1], -1)


_BLOCKS_PER_MATMUL = 1 << 15  # bounds the temporary copy of the windows (23 taps: ~3 MB)


def _apply(kernel: SincKernel, buf: np.ndarray) -> np.ndarray:
    """Every complete block of a zero-padded float32 buffer: conv1d(buf, weights, stride=orig), interleaved.

    Block b reads buf[b * orig : b * orig + taps] (the window torchaudio's conv1d sees) and gives outputs
    b * new .. b * new + new - 1. Done as a float32 matmul over strided windows rather than torch's conv1d:
    the same sums (they agree to ~2e-7), 3-5x less CPU here, and no torch intra-op thread pool woken in
    the server's event loop. `buf` must be C-contiguous float32.
    """
    blocks = (buf.size - kernel.taps) // kernel.orig + 1 if buf.size >= kernel.taps else 0
    if blocks <= 0:
        return np.zeros(0, dtype=np.float32)
    step = buf.strides[0]
    # (np.ndarray over buf's memory: as_strided costs ~3 us more per call, a fifth of a streaming call.)
    windows = np.ndarray((blocks, kernel.taps), np.float32, buffer=buf, strides=(step * kernel.orig, step))
    if blocks <= _BLOCKS_PER_MATMUL:
        return (windows @ kernel.matrix).reshape(-1)
    parts = range(0, blocks, _BLOCKS_PER_MATMUL)
    return np.concatenate([(windows[b : b + _BLOCKS_PER_MATMUL] @ kernel.matrix).reshape(-1) for b in parts])


_CHUNK_CAPACITY = 4096  # input samples a chunk may have to go through the preallocated buffer (larger: a copy)
# (fill, chunk size) plans a resampler keeps: a client's steady chunks need one, the server's held-back audio
# (one 20 ms chunk or two joined, at a few fills; issue 14) a handful; each holds at most a chunk's rows.
_PLANS_KEPT = 4


def _group_size(kernel: SincKernel) -> int:
    """Blocks per row of the grouped product `StreamingResampler` uses (1: the plain one, as `_apply`).

    The product alone, per 20 ms chunk (thread CPU, this project's CPU), plain vs copied in groups: 24 -> 16 kHz
    4.0 vs 2.5 us (4 blocks a row); 8 -> 16 kHz 3.3 vs 2.1 (8); 24 -> 8 kHz 5.7 vs 2.6 (4); 16 -> 24 kHz 3.5
    vs 2.6 (4). Rows grow by `orig` samples per block: groups only while a row stays within ~12 + taps."""
    return 1 << max(0, min(3, (12 // kernel.orig).bit_length() - 1))


@lru_cache(maxsize=16)
def _grouped_matrix(kernel: SincKernel, group: int) -> np.ndarray:
    """The kernel for `group` consecutive blocks at once: rows of ``orig * (group - 1) + taps`` input samples
    (block b's window starts ``orig * b`` into the row) -> ``new * group`` outputs in their order. Block b's
    columns hold the kernel at its window's rows and zeros elsewhere: the same products, plus exact zeros."""
    rows, cols = kernel.orig * (group - 1) + kernel.taps, kernel.new * group
    matrix = np.zeros((rows, cols), np.float32)
    for b in range(group):
        matrix[kernel.orig * b : kernel.orig * b + kernel.taps, kernel.new * b : kernel.new * (b + 1)] = kernel.matrix
    matrix.setflags(write=False)
    return matrix


# PCM16 sample -> float, as the wire decodes it (server/wire/audio_codec.py's PCM16_SCALE, which the model layer
# cannot import; tests/test_resample.py checks `pcm16` against the wire's decoding bit for bit).
PCM16_SCALE = np.float32(1 / 32768)


@lru_cache(maxsize=16)
def _pcm16_matrix(kernel: SincKernel, group: int) -> np.ndarray:
    """`_grouped_matrix` times `PCM16_SCALE`: applied to int16 samples it gives, bit for bit, what the plain one
    gives applied to the samples times the scale (a power of two: every product and sum is the same number
    times 2**-15, so each rounds the same way)."""
    matrix = _grouped_matrix(kernel, group) * PCM16_SCALE
    matrix.setflags(write=False)
    return matrix


# (into, fill after, windows, their rows' copy, the last blocks' windows, held-back samples: to, from): views
# of a StreamingResampler's buffer for one (fill, chunk size), see `_make_plan`.
_Plan = tuple[np.ndarray, int, np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None,
              np.ndarray | None]


class StreamingResampler:
    """Mono chunk-by-chunk resampling whose concatenated output equals `resample` of the whole stream.

    Each output block needs ``width + orig`` input samples to its right, so a chunk's output lags its
    input by that much (24 -> 16 kHz: 13 input samples, 0.54 ms); `flush` ends the stream with the
    offline zero padding, returns the held-back tail and makes the resampler ready for a new stream.

    Per chunk (issue 14: 20 ms of it, fifty times a second per session, in the server's event loop): the
    held-back samples and the chunk share one preallocated buffer; the complete windows are copied, `group`
    consecutive blocks to a row, into a contiguous matrix and multiplied by the kernel for that many blocks
    (`_grouped_matrix`) in one BLAS product (numpy's product over the strided windows themselves cannot use
    BLAS: its rows overlap); the views and the matrix are kept for the last few (fill, chunk size) pairs. The sums are
    those of `_apply` (the same kernel, the same windows, plus products with exact zeros) in BLAS's order:
    equal to `resample` to float32 rounding (~2e-7; tests/test_resample.py). ~4 us per 20 ms chunk at
    24 -> 16 kHz on this project's CPU, against 9 us with a concatenation, a new view and numpy's own
    product per call (bench/hot_path.py; soxr's stream: ~6.5 us). Samples must be finite (audio is): a
    row's zero coefficients would turn an inf nearby into NaN where `_apply` gives inf.
    """

    def __init__(self, orig_rate: int, new_rate: int, *, pcm16_input: bool = False) -> None:
        """``pcm16_input``: the stream comes as PCM16 bytes (`pcm16`), which the buffer then keeps as they
        come (int16): no view and no scaled copy per chunk. Such a resampler takes nothing else (float
        samples: TypeError)."""
        _check_rates(orig_rate, new_rate)
        self.orig_rate, self.new_rate = int(orig_rate), int(new_rate)
        kernel = self._kernel = None if self.orig_rate == self.new_rate else sinc_kernel(self.orig_rate, self.new_rate)
        # buf[:fill] holds the input not yet consumed (fewer than `taps` samples between calls).
        self._buf = np.zeros(0 if kernel is None else kernel.taps + _CHUNK_CAPACITY, np.float32)
        self._group = 1 if kernel is None else _group_size(kernel)
        self._grouped = None if kernel is None or self._group == 1 else _grouped_matrix(kernel, self._group)
        self._matrix = None if kernel is None else kernel.matrix
        # Plans by (fill, chunk size): views of the buffer, valid for its life, so kept across streams.
        self._plans: dict[tuple[int, int], _Plan] = {}
        # PCM16 input: the buffer is int16 and written through its bytes; the grouped product's matrix carries
        # the scale. Only where the product is grouped (a row copy converts the samples anyway; 24, 32, 48 and
        # 8 kHz -> 16 kHz) and the machine is little-endian like the wire; otherwise `pcm16` converts first.
        self._pcm16_input = pcm16_input
        self._bytes: memoryview | None = None
        if pcm16_input and self._grouped is not None and sys.byteorder == "little":
            assert kernel is not None
            self._buf = np.zeros(kernel.taps + _CHUNK_CAPACITY, np.int16)
            self._bytes = memoryview(self._buf).cast("B")
            self._grouped = _pcm16_matrix(kernel, self._group)
        self._reset()

    def _reset(self) -> None:
        self._fill = self._kernel.width if self._kernel is not None else 0  # the offline left zero padding
        self._buf[: self._fill] = 0.0
        self._received = 0  # input samples of this stream
        self._emitted = 0  # output samples of this stream

    @property
    def delay_samples(self) -> int:
        """Input samples held back until more input (or `flush`) arrives."""
        return 0 if self._kernel is None else self._kernel.width + self._kernel.orig

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        """Feed the next chunk; returns every output sample that no longer depends on future input."""
        if self._pcm16_input:
            raise TypeError("this resampler takes PCM16 bytes (pcm16); it was made with pcm16_input=True")
        if type(samples) is not np.ndarray or samples.ndim != 1 or samples.dtype != np.float32:
            samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self._kernel is None:
            return samples.reshape(-1)
        self._received += samples.size
        return self._run(samples)

    def scaled(self, samples: np.ndarray, scale: np.ndarray) -> np.ndarray:
        """``self(samples * scale)`` (int16 samples, a float32 scale), the product written straight into the
        buffer: the same float32 values without an array between (issue 14)."""
        if self._pcm16_input:
            raise TypeError("this resampler takes PCM16 bytes (pcm16); it was made with pcm16_input=True")
        return self._scaled(samples, scale)

    def _scaled(self, samples: np.ndarray, scale: np.ndarray) -> np.ndarray:
        if self._kernel is None:
            return (samples * scale).reshape(-1)
        self._received += samples.size
        return self._run(samples, scale)

    def pcm16(self, raw: bytes) -> np.ndarray:
        """Feed little-endian PCM16 bytes (an even count): exactly ``self.scaled(int16 samples, PCM16_SCALE)``
        of a resampler made without ``pcm16_input``, fewer numpy calls per chunk with it (issue 14)."""
        if len(raw) % 2:
            raise ValueError(f"PCM16 needs an even number of bytes; got {len(raw)}")
        if self._bytes is None:  # not made for PCM16, ungrouped or equal rates, big-endian: the float buffer
            return self._scaled(np.frombuffer(raw, "<i2"), PCM16_SCALE)
        self._received += len(raw) // 2
        return self._run16(raw)

    def would_emit(self, more: int) -> int:
        """How many output samples `more` further input samples would return now (in one chunk or several)."""
        kernel = self._kernel
        if kernel is None:
            return more
        end = self._fill + more
        return 0 if end < kernel.taps else ((end - kernel.taps) // kernel.orig + 1) * kernel.new

    def inputs_below(self, out: int) -> int:
        """The most further input samples that return fewer than `out` output samples (-1 when `out` <= 0):
        `would_emit` inverted, for holding input back until it completes something (server/realtime.py)."""
        kernel = self._kernel
        if kernel is None:
            return out - 1
        if out <= 0:
            return -1
        # blocks * new < out  <=>  blocks <= (out - 1) // new;  blocks <= b  <=>  fill + m < b * orig + taps
        return (out - 1) // kernel.new * kernel.orig + kernel.taps - self._fill - 1

    def flush(self) -> np.ndarray:
        """End the stream: the remaining output (zero padding on the right, as offline), then reset."""
        kernel = self._kernel
        if kernel is None:
            return np.zeros(0, dtype=np.float32)
        pad = kernel.width + kernel.orig
        tail = self._run16(bytes(2 * pad)) if self._bytes is not None else self._run(np.zeros(pad, np.float32))
        tail = tail[: max(0, kernel.output_length(self._received) - (self._emitted - tail.size))]
        self._reset()
        return tail

    def _run(self, chunk: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
        """Append a float32 chunk (or ``chunk * scale``) to buf[:fill]; the output of every complete block,
        which it consumes."""
        key = (self._fill, chunk.size)
        plan = self._plans.get(key) or self._make_plan(*key)
        if plan is None:  # a long chunk: through a new array, as one offline call would
            return self._run_long(chunk if scale is None else chunk * scale)
        into = plan[0]
        if scale is None:
            into[...] = chunk
        else:
            np.multiply(chunk, scale, out=into)
        return self._consume(plan)

    def _consume(self, plan: _Plan) -> np.ndarray:
        """With the plan's chunk in the buffer: the output of every complete block, which it consumes."""
        _, fill, windows, rows, tail, keep, kept = plan
        self._fill = fill
        if windows is None:  # not one complete window yet
            return np.zeros(0, dtype=np.float32)
        if rows is None:  # no grouping: `_apply`'s product
            out = (windows @ self._matrix).ravel()
        else:
            np.copyto(rows, windows)  # (from an int16 buffer: converted as copied, exactly)
            out = np.dot(rows, self._grouped).ravel()
            if tail is not None:  # blocks beyond the last whole group (an odd chunk size)
                if self._bytes is not None:  # int16 windows: multiplied as `_run` multiplies their float32 values
                    assert self._kernel is not None
                    tail = self._float_windows(tail, rows.shape[0] * self._group * self._kernel.orig)
                out = np.concatenate((out, (tail @ self._matrix).ravel()))
        keep[...] = kept  # the held-back input to the buffer's front (numpy copies overlaps safely)
        self._emitted += out.size
        return out

    def _make_plan(self, fill: int, size: int) -> _Plan | None:
        """Views of the buffer for `size` samples appended to buf[:fill] (None: they do not fit): where they go,
        the samples held back afterwards, the complete windows (grouping: rows of `group` blocks, the matrix
        those are copied to and the windows of the blocks after the last whole group), and where the
        held-back samples go from where."""
        kernel, buf, group = self._kernel, self._buf, self._group
        assert kernel is not None
        end = fill + size
        if end > buf.size:
            return None
        into = buf[fill:end]
        if end < kernel.taps:
            return self._keep_plan(fill, size, (into, end, None, None, None, None, None))
        blocks = (end - kernel.taps) // kernel.orig + 1
        step, used = buf.strides[0], blocks * kernel.orig
        keep, kept = buf[: end - used], buf[used:end]
        if group == 1:
            windows = np.ndarray((blocks, kernel.taps), buf.dtype, buffer=buf, strides=(step * kernel.orig, step))
            return self._keep_plan(fill, size, (into, end - used, windows, None, None, keep, kept))
        count, width = blocks // group, kernel.orig * (group - 1) + kernel.taps
        grouped = np.ndarray((count, width), buf.dtype, buffer=buf, strides=(step * kernel.orig * group, step))
        tail = None
        if blocks % group:
            tail = np.ndarray((blocks % group, kernel.taps), buf.dtype, buffer=buf,
                              offset=count * group * kernel.orig * step, strides=(step * kernel.orig, step))
        return self._keep_plan(fill, size, (into, end - used, grouped, np.empty((count, width), np.float32), tail,
                                            keep, kept))

    def _keep_plan(self, fill: int, size: int, plan: _Plan) -> _Plan:
        if len(self._plans) >= _PLANS_KEPT:
            self._plans.clear()
        self._plans[fill, size] = plan
        return plan

    def _run16(self, raw: bytes) -> np.ndarray:
        """`_run` for PCM16 bytes into the int16 buffer: the bytes copied in, the grouped windows converted as
        they are copied to the rows, the product with the scaled matrix; the same float32 output."""
        key = (self._fill, len(raw) // 2)
        plan = self._plans.get(key) or self._make_plan(*key)
        if plan is None:
            return self._run16_long(raw)
        start, data = self._fill * 2, self._bytes  # the samples go in through the bytes, not the plan's view
        assert data is not None
        data[start : start + len(raw)] = raw
        return self._consume(plan)

    def _float_windows(self, windows: np.ndarray, first: int) -> np.ndarray:
        """The buffer's overlapping int16 windows from sample `first` on, as the float32 windows `_run` would
        multiply: the same shape and sample strides over a scaled copy (numpy sums them in the same order)."""
        hop = windows.strides[0] // self._buf.strides[0]
        samples = self._buf[first : first + (windows.shape[0] - 1) * hop + windows.shape[1]] * PCM16_SCALE
        return np.ndarray(windows.shape, np.float32, buffer=samples, strides=(hop * 4, 4))

    def _run16_long(self, raw: bytes) -> np.ndarray:
        kernel = self._kernel
        assert kernel is not None
        whole16 = np.concatenate((self._buf[: self._fill], np.frombuffer(raw, "<i2")))
        out = _apply(kernel, whole16 * PCM16_SCALE)  # `_run_long` on the float32 samples
        rest = whole16[out.size // kernel.new * kernel.orig :]
        self._buf[: rest.size] = rest
        self._fill = rest.size
        self._emitted += out.size
        return out

    def _run_long(self, chunk: np.ndarray) -> np.ndarray:
        kernel = self._kernel
        assert kernel is not None
        whole = np.concatenate((self._buf[: self._fill], chunk))
        out = _apply(kernel, whole)
        rest = whole[out.size // kernel.new * kernel.orig :]
        self._buf[: rest.size] = rest
        self._fill = rest.size
        self._emitted += out.size
        return out
