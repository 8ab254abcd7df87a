"""Upstream's streaming of codec tokens to audio, as two small pure state machines (no I/O, no clock).

`TokenWindows` (upstream `llm2TTS.run`): codec tokens arrive one by one. Once `left + chunk + padding` tokens are
buffered, that window is decoded by the codec and its audio is kept without the first `left` and the last
`padding` tokens' samples; then the last `2 * padding` tokens stay buffered and `left = padding`. At the end, the
rest is decoded and kept without its first `left` tokens. Chunk 20 for a response's first sentence, 40 later,
padding 10, 600 samples per token. So, first sentence: windows of tokens [0, 30) keep [0, 20), [10, 50) keep
[20, 40), [30, 70) keep [40, 60), ...

`AudioCutter` (upstream `find_min_sum_index`): each kept chunk is cut at a quiet point so playback seams fall in
silence. Window sums of |x| over N = 2401 samples are searched from the middle of the chunk on; if the quietest
window's mean is below the threshold (0.1 first sentence, 0.015 later) the chunk is cut at the quietest single
sample near that window (upstream's exact index arithmetic, quirks included): everything held back plus the part
before the cut is emitted, the rest is held back; otherwise the whole chunk is held back. The last chunk is
emitted with everything held back.

`trim_leading_silence` (upstream web demo): for the first sentence every emitted piece loses the samples before
its first |x| > 0.03 (all of them when none is louder: upstream then keeps the piece whole).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PADDING_TOKENS = 10
CUT_WINDOW = 2401
TRIM_LEVEL = 0.03


@dataclass(frozen=True)
class StreamParams:
    chunk: int
    threshold: float
    trim_leading: bool
    padding: int = PADDING_TOKENS
    window: int = CUT_WINDOW
    samples_per_token: int = 600


FIRST_SENTENCE = StreamParams(chunk=20, threshold=0.1, trim_leading=True)
LATER_SENTENCE = StreamParams(chunk=40, threshold=0.015, trim_leading=False)


@dataclass(frozen=True)
class CodecWindow:
    """Tokens to decode together, and how many tokens' worth of samples to drop at each end."""

    tokens: tuple[int, ...]
    drop_left: int
    drop_right: int
    final: bool

    def keep(self, audio: torch.Tensor, samples_per_token: int) -> torch.Tensor:
        """The kept part of the decoded window (last axis is time)."""
        start = self.drop_left * samples_per_token
        end = audio.shape[-1] - self.drop_right * samples_per_token
        return audio[..., start:end]


class TokenWindows:
    def __init__(self, params: StreamParams) -> None:
        self.params = params
        self._buffer: list[int] = []
        self._left = 0

    def push(self, token: int) -> CodecWindow | None:
        p = self.params
        self._buffer.append(int(token))
        if len(self._buffer) < self._left + p.chunk + p.padding:
            return None
        window = CodecWindow(tuple(self._buffer), self._left, p.padding, final=False)
        self._left = p.padding
        self._buffer = self._buffer[-(self._left + p.padding) :]
        return window

    def finish(self) -> CodecWindow | None:
        if not self._buffer:
            return None
        window = CodecWindow(tuple(self._buffer), self._left, 0, final=True)
        self._buffer = []
        return window


def find_cut(chunk: torch.Tensor, window: int, threshold: float) -> int | None:
    """Upstream's cut index in a 1-D chunk, or None when no window is quiet enough.

    Window sums come from a float64 running sum (O(length)); upstream convolves with a ones kernel in float32
    (O(length * window): ~90 ms per chunk on one CPU core). Same sums up to rounding, same rule."""
    x = chunk.abs().to(torch.float64)
    length = x.shape[-1]
    mid = length // 2
    running = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(x, 0)])
    sums = running[window:] - running[:-window]
    search_from = mid - window // 2
    min_sum, offset = torch.min(sums[search_from:], dim=0)
    start = max(0, int(offset) + search_from)
    end = min(length, int(offset) + window + start)  # sic: upstream adds the offset twice
    _, quietest = torch.min(x[start:end], dim=0)
    if float(min_sum) / window < threshold:
        return int(quietest) + start
    return None


class AudioCutter:
    def __init__(self, params: StreamParams) -> None:
        self.params = params
        self._held = torch.zeros(0)

    def push(self, chunk: torch.Tensor, final: bool = False) -> torch.Tensor | None:
        """A kept 1-D chunk in; the audio to play now (or None) out."""
        chunk = chunk.reshape(-1)
        if final:
            out = torch.cat([self._held.to(chunk.dtype), chunk])
            self._held = torch.zeros(0)
            return out
        cut = find_cut(chunk, self.params.window, self.params.threshold)
        if cut is None:
            self._held = torch.cat([self._held.to(chunk.dtype), chunk])
            return None
        out = torch.cat([self._held.to(chunk.dtype), chunk[:cut]])
        self._held = chunk[cut:].clone()
        return out


def trim_leading_silence(piece: torch.Tensor, level: float = TRIM_LEVEL) -> torch.Tensor:
    loud = torch.nonzero(piece.abs() > level)
    if loud.numel() == 0:
        return piece
    return piece[int(loud[0, -1]) :] if piece.dim() == 1 else piece[..., int(loud[0, -1]) :]


class SentenceStream:
    """Windows + cutter + trim for one sentence: tokens in, (window to decode) and (audio to play) out."""

    def __init__(self, params: StreamParams) -> None:
        self.params = params
        self.windows = TokenWindows(params)
        self.cutter = AudioCutter(params)

    def decoded(self, window: CodecWindow, audio: torch.Tensor) -> torch.Tensor | None:
        """The codec's output for `window` (any shape ending in time) -> audio to play now, if any."""
        piece = self.cutter.push(
            window.keep(audio, self.params.samples_per_token).reshape(-1), final=window.final
        )
        if piece is None:
            return None
        if self.params.trim_leading:
            piece = trim_leading_silence(piece)
        return piece
