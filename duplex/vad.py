"""Silero VAD on onnxruntime: sans-I/O segmentation per stream, one batched model call across streams.

Three layers:

* `SileroModel` wraps the ONNX graph shipped in the ``silero-vad`` wheel. The graph takes a batch, so
  one ``run_batch`` call scores one 32 ms window for each of B streams. By default it runs that graph
  rewritten in memory by `duplex.vad_graph` (each Conv as one MatMul over the whole batch, ~3x less CPU
  per window), checked against the stock graph on load.
* `VadStream` is one audio stream's state: pending samples, the model's 64-sample context and LSTM state,
  recent audio kept for prefix padding, and the speech/silence state machine. It does no I/O and reads no
  clock: time is the count of 16 kHz samples pushed so far.
* `VadBank` holds many streams and scores every stream that has a full window in one ONNX call per round.

Segmentation follows OpenAI's ``server_vad`` knobs (threshold, prefix_padding_ms, silence_duration_ms)
plus Silero's minimum speech duration and hysteresis (``neg_threshold = max(threshold - 0.15, 0.01)``).

The package is located with ``importlib.util.find_spec`` and never imported: importing ``silero_vad``
pulls in torch and sets torch to one thread for the whole process.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

SAMPLE_RATE = 16_000
WINDOW = 512  # samples per model call at 16 kHz (32 ms); the graph rejects any other size
CONTEXT = 64  # samples of the previous window the model expects in front of each window
STATE_SHAPE = (2, 1, 128)
# Samples a stream's input buffer holds before `VadStream.push` moves its unscored tail to a new one: pushes
# write into the free end (no array per 20 ms push; issue 14) and the move costs one copy per ~1 s of audio.
BUFFER_SAMPLES = 16_384
# A new buffer holds this many times the unscored tail plus the push (at least BUFFER_SAMPLES): when rounds
# fall behind, the tail grows and moves get rarer in proportion, so pushes stay linear (amortised) instead of
# copying the whole backlog on every push, which would make a loop that falls behind fall further behind.
BUFFER_GROWTH = 2

log = logging.getLogger(__name__)


def _ms_to_samples(ms: float) -> int:
    return round(ms * SAMPLE_RATE / 1000)


@dataclass(frozen=True, slots=True)
class VadParams:
    """Turn-detection settings, named as OpenAI's ``server_vad`` plus a minimum speech duration.

    ``max_speech_ms`` (None = unbounded) force-ends a segment that runs that long, bounding the audio a
    stream can hold when someone (or something) never stops talking.
    """

    threshold: float = 0.5
    prefix_padding_ms: float = 300.0
    silence_duration_ms: float = 500.0
    min_speech_ms: float = 250.0
    max_speech_ms: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        for name in ("prefix_padding_ms", "silence_duration_ms", "min_speech_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_speech_ms is not None and self.max_speech_ms <= 0:
            raise ValueError("max_speech_ms must be > 0 or None")

    @property
    def neg_threshold(self) -> float:
        """Probability below which a window counts as silence (Silero's hysteresis)."""
        return max(self.threshold - 0.15, 0.01)


# --- events -------------------------------------------------------------------------------------
# Named apart from the controller's `duplex.events.SpeechStarted` & co., which carry other fields (session
# samples); `duplex.echo.EchoGate` turns these into those.


@dataclass(frozen=True, slots=True)
class VadSpeechStart:
    """Speech began. ``onset_sample`` is the first speech window's start; ``start_sample`` is that
    minus the prefix padding (clamped to the audio still held and to the previous segment's end)."""

    start_sample: int
    onset_sample: int


@dataclass(frozen=True, slots=True)
class VadSpeechEnd:
    """A segment closed after ``silence_duration_ms`` of silence. ``end_sample`` is where silence began
    (the end of the last window scored >= threshold), not where the timer ran out; ``audio`` is
    ``input[start_sample:end_sample]`` (16 kHz float32), prefix padding included."""

    start_sample: int
    end_sample: int
    audio: np.ndarray = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class VadSpeechDiscard:
    """A segment shorter than ``min_speech_ms`` was dropped; whatever the `VadSpeechStart` paused
    (e.g. the assistant's playback) can resume."""

    start_sample: int
    end_sample: int


VadEvent = VadSpeechStart | VadSpeechEnd | VadSpeechDiscard


# --- model --------------------------------------------------------------------------------------


def default_model_path() -> Path:
    """The ``silero_vad.onnx`` inside the installed ``silero-vad`` wheel, found without importing it."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("silero-vad is not installed: pip install silero-vad (its ONNX weights are used)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "silero_vad.onnx"
    if not path.is_file():
        raise RuntimeError(f"silero-vad is installed but {path} is missing")
    return path


class SileroModel:
    """One onnxruntime session over the Silero graph, single-threaded so many sessions share a core.

    Graph: ``input [B, 64+512] float32``, ``state [2, B, 128] float32``, ``sr`` int64 scalar ->
    ``output [B, 1]``, ``stateN [2, B, 128]``. ``run`` is thread-safe (onnxruntime sessions are).

    ``graph="batched"`` (default) runs the stock graph rewritten so that each Conv is one MatMul over the
    whole batch (`duplex.vad_graph`, ~3x faster per window at large batches); it is checked against the
    stock graph on load, and if the rewrite or the check fails the stock graph is used with a warning.
    ``graph="stock"`` runs the file as shipped. ``self.graph`` says which one runs.
    """

    def __init__(
        self, path: str | os.PathLike[str] | None = None, graph: Literal["batched", "stock"] = "batched"
    ) -> None:
        if graph not in ("batched", "stock"):
            raise ValueError(f"graph must be 'batched' or 'stock', got {graph!r}")
        self.path = Path(path) if path is not None else default_model_path()
        self._session = _session(str(self.path))
        self.graph = "stock"
        if graph == "batched":
            from duplex import vad_graph

            try:
                batched = _session(vad_graph.batched_graph(self.path))
                vad_graph.check_equivalent(batched, self._session)
            except Exception as e:  # noqa: BLE001 - any failure means: keep the stock graph
                log.warning("Silero graph rewrite failed, using the stock graph (slower when batched): %s", e)
            else:
                self._session, self.graph = batched, "batched"
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def run_batch(self, windows: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score B windows: ``windows (B, 576)``, ``states (2, B, 128)`` -> ``(probs (B,), states')``."""
        if windows.ndim != 2 or windows.shape[1] != CONTEXT + WINDOW:
            raise ValueError(f"windows must be (B, {CONTEXT + WINDOW}), got {windows.shape}")
        if states.shape != (2, windows.shape[0], 128):
            raise ValueError(f"states must be (2, {windows.shape[0]}, 128), got {states.shape}")
        out, new_states = self._session.run(
            None,
            {
                "input": np.ascontiguousarray(windows, dtype=np.float32),
                "state": np.ascontiguousarray(states, dtype=np.float32),
                "sr": self._sr,
            },
        )
        return out[:, 0], new_states


def _session(model: str | bytes):
    import onnxruntime as ort  # deferred: importing it costs ~0.1 s

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


# --- one stream ---------------------------------------------------------------------------------


def _as_float32(samples: np.ndarray | Iterable[float]) -> np.ndarray:
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"expected mono 1-D samples, got shape {x.shape}")
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    return x.astype(np.float32, copy=False)


class VadStream:
    """Segmentation state for one 16 kHz mono stream. Sans-I/O: `push` buffers, the model is run by the
    caller (`process` for one stream, `VadBank` for many), and events come back as values. Not
    thread-safe: drive each stream from one thread or event loop.

    Samples are float32 in [-1, 1] (int16 is accepted and scaled). Sample numbers in events count from
    the first sample ever pushed.
    """

    def __init__(self, params: VadParams | None = None) -> None:
        self.params = params or VadParams()
        self.state = np.zeros(STATE_SHAPE, dtype=np.float32)
        # Pending input with the model's context in front: the next window is buf[pos-64 : pos+512],
        # a view, so batching copies each window once; buf[:end] is written, the rest is free. Written
        # samples are never overwritten (scored windows stay in _hist as views): a full buffer is replaced.
        # Starts with 64 zeros as Silero does.
        self._buf = np.zeros(CONTEXT + BUFFER_SAMPLES, dtype=np.float32)
        self._pos = self._end = CONTEXT
        self.processed = 0  # samples scored so far == start sample of the next window
        self._pad = _ms_to_samples(self.params.prefix_padding_ms)
        self._silence = _ms_to_samples(self.params.silence_duration_ms)
        self._min_speech = _ms_to_samples(self.params.min_speech_ms)
        self._max_speech = (
            None if self.params.max_speech_ms is None else _ms_to_samples(self.params.max_speech_ms)
        )
        # Scored audio still held, one window per entry: the prefix padding while idle, the whole
        # segment while speaking. _hist_start is the sample number of _hist[0][0].
        self._hist: deque[np.ndarray] = deque()
        self._hist_start = 0
        self._floor = 0  # a new segment's padding never reaches back before the last segment's end
        self._in_speech = False
        self._onset = 0
        self._start = 0
        self._silence_start: int | None = None  # start of the first window below neg_threshold
        self._speech_end = 0  # end of the last window at or above threshold

    # input ---------------------------------------------------------------------------------------

    def push(self, samples: np.ndarray | Iterable[float]) -> None:
        """Buffer samples; nothing is scored until the model runs."""
        x = _as_float32(samples)
        n, end = x.size, self._end
        if end + n > self._buf.size:  # full: the unscored tail (with its context) moves to a new buffer
            tail = self._buf[self._pos - CONTEXT : end]
            self._buf = np.empty(max(BUFFER_SAMPLES, BUFFER_GROWTH * (tail.size + n)) + CONTEXT, np.float32)
            end = tail.size
            self._buf[:end] = tail
            self._pos = CONTEXT
        self._buf[end : end + n] = x
        self._end = end + n

    def held_bytes(self) -> int:
        """Audio this stream holds: buffered input (from the next window's context) and the scored audio kept
        for a segment; the buffer's free end (at most 64 KiB a stream) is not counted."""
        return (self._end - self._pos + CONTEXT + len(self._hist) * WINDOW) * 4  # kept windows: 512 samples

    @property
    def windows_ready(self) -> int:
        """Full 512-sample windows buffered and not yet scored."""
        return (self._end - self._pos) // WINDOW

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    # model hand-off (used by process() and VadBank) ----------------------------------------------

    def _take_window(self) -> np.ndarray:
        """The next (576,) model input: 64 context samples + 512 new ones. Must be followed by
        `_accept` with that window's probability and state."""
        w = self._buf[self._pos - CONTEXT : self._pos + WINDOW]
        self._pos += WINDOW
        return w

    def _accept(self, window: np.ndarray, prob: float, state: np.ndarray) -> list[VadEvent]:
        """Advance the state machine by one scored window."""
        self.state = state
        start = self.processed
        end = start + WINDOW
        self.processed = end
        self._hist.append(window[CONTEXT:])
        events: list[VadEvent] = []
        p = self.params
        if not self._in_speech:
            if prob >= p.threshold:
                self._in_speech = True
                self._onset = start
                self._start = max(start - self._pad, self._hist_start, self._floor)
                self._silence_start = None
                self._speech_end = end
                events.append(VadSpeechStart(self._start, start))
            else:
                self._trim()
            return events
        if prob >= p.threshold:
            self._silence_start = None
            self._speech_end = end
        elif prob < p.neg_threshold and self._silence_start is None:
            self._silence_start = start
        # Silero's hysteresis: the silence timer runs from the first window below neg_threshold and
        # only a window at/above threshold resets it; the segment ends where speech did.
        if self._silence_start is not None and end - self._silence_start >= self._silence:
            events.append(self._close(self._speech_end))
        elif self._max_speech is not None and end - self._onset >= self._max_speech:
            events.append(self._close(self._speech_end if self._silence_start is not None else end))
        return events

    def _close(self, end: int) -> VadEvent:
        self._in_speech = False
        self._silence_start = None
        start = self._start
        self._floor = end
        if end - self._onset < self._min_speech:
            event: VadEvent = VadSpeechDiscard(start, end)
        else:
            event = VadSpeechEnd(start, end, self._slice(start, end))
        self._trim()
        return event

    def _slice(self, start: int, end: int) -> np.ndarray:
        audio = np.concatenate(self._hist) if self._hist else np.zeros(0, np.float32)
        return audio[start - self._hist_start : end - self._hist_start].copy()

    def _trim(self) -> None:
        # Keep just enough whole windows that the next window's onset can reach back by the padding.
        keep_from = self.processed - self._pad
        while self._hist and self._hist_start + WINDOW <= keep_from:
            self._hist.popleft()
            self._hist_start += WINDOW

    # per-stream driving --------------------------------------------------------------------------

    def process(self, model: SileroModel) -> list[VadEvent]:
        """Score every buffered window with one model call each (the unbatched path)."""
        events: list[VadEvent] = []
        while self.windows_ready:
            w = self._take_window()
            probs, state = model.run_batch(w[None, :], self.state)
            events.extend(self._accept(w, float(probs[0]), state))
        return events

    def flush(self) -> list[VadEvent]:
        """Close an open segment now (end of input), ending at its last speech window. A partial window
        (< 32 ms) stays buffered and is not scored."""
        if not self._in_speech:
            return []
        return [self._close(self._speech_end)]


# --- many streams -------------------------------------------------------------------------------


class VadBank:
    """Many `VadStream`s scored together: each `process` round makes ONE ``run_batch`` call over every
    stream with a full window, so hundreds of real-time streams share one core.

    ``max_batch`` caps the rows per call; None = no cap. With the batched graph 256-row calls cost
    ~10% less per window than 1024-row ones (smaller intermediates stay in cache; bench/vad_streams.py).
    """

    def __init__(self, model: SileroModel | None = None, max_batch: int | None = 256, *,
                 scan_all: bool = False) -> None:
        self.model = model if model is not None else SileroModel()
        self.max_batch = max_batch
        self.scan_all = scan_all  # True: every round checks every stream (before issue 14; for benchmarks)
        self._streams: dict[Hashable, VadStream] = {}
        self._rank: dict[Hashable, int] = {}  # insertion order of the streams (rounds go in this order)
        self._next_rank = itertools.count()
        # Streams pushed to since their windows were last all scored: a round looks at these only, not at
        # every stream (of a thousand open sessions, a few dozen have new audio at a 10 ms tick).
        self._pushed: dict[Hashable, None] = {}
        # Rank of the last stream a capped round took (None: the last round took every ready stream), so
        # the next round starts after it and no stream waits behind others' backlog.
        self._resume_after: int | None = None

    def add_stream(self, stream_id: Hashable, params: VadParams | None = None) -> VadStream:
        """A new stream; push its audio with `push` (the bank scores what was pushed through it)."""
        if stream_id in self._streams:
            raise KeyError(f"stream {stream_id!r} already exists")
        stream = VadStream(params)
        self._streams[stream_id] = stream
        self._rank[stream_id] = next(self._next_rank)
        return stream

    def remove_stream(self, stream_id: Hashable) -> None:
        self._streams.pop(stream_id, None)
        self._rank.pop(stream_id, None)
        self._pushed.pop(stream_id, None)

    def detach(self, stream_id: Hashable) -> VadStream:
        """Take a stream out of the batched rounds (to score it elsewhere, e.g. in a thread); `attach` puts
        it back."""
        stream = self._streams.pop(stream_id)
        self._rank.pop(stream_id, None)
        self._pushed.pop(stream_id, None)
        return stream

    def attach(self, stream_id: Hashable, stream: VadStream) -> None:
        if stream_id in self._streams:
            raise KeyError(f"stream {stream_id!r} already exists")
        self._streams[stream_id] = stream
        self._rank[stream_id] = next(self._next_rank)
        self._pushed[stream_id] = None

    def stream(self, stream_id: Hashable) -> VadStream:
        return self._streams[stream_id]

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def push(self, stream_id: Hashable, samples: np.ndarray | Iterable[float]) -> None:
        """Buffer samples for one stream; scoring happens in `process`."""
        self._streams[stream_id].push(samples)
        self._pushed[stream_id] = None

    def process(self) -> list[tuple[Hashable, VadEvent]]:
        """Score all full windows, one batched call per round, until no stream has a full window.
        Events of one stream come in time order; within a round, in stream insertion order."""
        events: list[tuple[Hashable, VadEvent]] = []
        while group := self.take_round():
            events += self.finish_round(group, *self.score_round(group))
        return events

    def score_round(self, group: list[tuple[Hashable, VadStream, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """A round's ``(probs, states)`` from this process's model (`duplex.vad_worker` does the same apart)."""
        return self.model.run_batch(np.stack([w for _, _, w in group]),
                                    np.concatenate([s.state for _, s, _ in group], axis=1))

    def take_round(self, max_rows: int | None = None) -> list[tuple[Hashable, VadStream, np.ndarray]]:
        """The next round: one window from each stream that has one (at most ``max_rows``, else
        ``max_batch``), in stream insertion order; each must come back through `finish_round` before that
        stream's next round. The model may run anywhere meanwhile (`duplex.vad_worker`)."""
        streams = self._streams
        if self.scan_all:
            ready = [sid for sid, s in streams.items() if s.windows_ready]
        else:
            ready = [sid for sid in sorted(self._pushed, key=self._rank.__getitem__) if streams[sid].windows_ready]
        # Every ready stream stays marked: it may hold more windows than this round takes.
        self._pushed = dict.fromkeys(ready)
        cap = max_rows or self.max_batch or len(ready)
        if self._resume_after is not None:  # the last capped round stopped there: the streams after it go first
            rank = self._rank.get
            first = next((i for i, sid in enumerate(ready) if rank(sid, -1) > self._resume_after), 0)
            ready = ready[first:] + ready[:first]
        self._resume_after = self._rank[ready[cap - 1]] if len(ready) > cap else None
        return [(sid, s, s._take_window()) for sid in ready[:cap] for s in (streams[sid],)]

    def finish_round(self, group: list[tuple[Hashable, VadStream, np.ndarray]], probs: np.ndarray,
                     states: np.ndarray) -> list[tuple[Hashable, VadEvent]]:
        """Advance each stream of a round by its window's probability and new state ``states[:, j]``.
        A stream removed (or replaced) since `take_round` is skipped."""
        events: list[tuple[Hashable, VadEvent]] = []
        streams = self._streams
        for j, (sid, s, w) in enumerate(group):
            if streams.get(sid) is not s:
                continue
            # copy: a view would pin the whole round's state array (or the worker's shared memory)
            for ev in s._accept(w, float(probs[j]), states[:, j : j + 1, :].copy()):
                events.append((sid, ev))
        return events

    def has_pending(self) -> bool:
        """Whether a stream pushed to may have a window to score (a cheap check: `take_round` decides)."""
        return bool(self._pushed) or self.scan_all

    def flush(self, stream_id: Hashable) -> list[VadEvent]:
        """Score the stream's remaining full windows on their own, then close its open segment."""
        stream = self._streams[stream_id]
        return stream.process(self.model) + stream.flush()
