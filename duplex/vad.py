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
  Its streams' LSTM states live in one table, ``(2, capacity, 128)``, a column (slot) per stream: a round
  gathers its rows' states with one numpy call and scatters the new ones back with another, instead of a
  copy per stream each way (issue 14: per-window numpy calls were most of the event loop's VAD cost).

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
STATE_WIDTH = STATE_SHAPE[2]  # floats of each of the LSTM's two state vectors
# Slots a bank's state table starts with (256 KiB): the streams of a server under load without growing; it
# doubles when full (a copy per doubling; slots are never given back to the allocator, only reused).
TABLE_SLOTS = 128
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


_FLOAT32 = np.dtype(np.float32)
_NO_EVENTS: tuple[VadEvent, ...] = ()  # what most windows give: one shared empty result, no list per window


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
        # The LSTM state: this array while the stream is alone; in a bank, a slot of the bank's `_StateTable`
        # (then _state is None). `state` reads and writes whichever holds it.
        self._state: np.ndarray | None = np.zeros(STATE_SHAPE, dtype=np.float32)
        self._table: _StateTable | None = None
        self._slot = -1
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
        # read for every window scored: attributes, not the params' fields (neg_threshold is computed)
        self._threshold = self.params.threshold
        self._neg_threshold = self.params.neg_threshold
        # Scored audio still held, one model window per entry (its 64 context samples, then the 512 scored
        # ones, a view of the input buffer): the prefix padding while idle, the whole segment while speaking.
        # _hist_start is the sample number of the first entry's first scored sample (after its context).
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
        # 1-D float32 (what the server pushes) needs no conversion: skip the call, asarray and astype
        x = samples if type(samples) is np.ndarray and samples.dtype is _FLOAT32 and samples.ndim == 1 \
            else _as_float32(samples)
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
    def samples_until_window(self) -> int:
        """Samples still to push before the buffer holds one more full window than now (1..512). Windows
        taken into a round count as scored, whether or not the round is back."""
        return WINDOW - (self._end - self._pos) % WINDOW

    @property
    def in_speech(self) -> bool:
        return self._in_speech

    @property
    def state(self) -> np.ndarray:
        """The model's LSTM state after the last window scored, ``(2, 1, 128)``. For a stream in a bank, a
        copy of its slot (a view would go stale when the table grows)."""
        table = self._table
        if table is None:
            assert self._state is not None
            return self._state
        return table.array[:, self._slot : self._slot + 1].copy()

    @state.setter
    def state(self, value: np.ndarray) -> None:
        table = self._table
        if table is None:
            self._state = value
        else:
            table.array[:, self._slot : self._slot + 1] = value

    def _join(self, table: _StateTable) -> None:
        """Move the state into a slot of a bank's table (the bank then gathers and scatters it)."""
        assert self._table is None and self._state is not None
        self._slot = table.acquire(self._state)
        self._table, self._state = table, None

    def _leave(self) -> None:
        """Take the state back out of the bank's table: the stream can be scored alone (another thread)."""
        table = self._table
        if table is None:
            return
        self._state = table.array[:, self._slot : self._slot + 1].copy()
        table.release(self._slot)
        self._table, self._slot = None, -1

    # model hand-off (used by process() and VadBank) ----------------------------------------------

    def _take_window(self) -> np.ndarray:
        """The next (576,) model input: 64 context samples + 512 new ones. Must be followed by
        `_accept` with that window and its probability, and the new state stored (`state`, or the bank's
        table)."""
        pos = self._pos
        self._pos = pos + WINDOW
        return self._buf[pos - CONTEXT : pos + WINDOW]

    def _accept(self, window: np.ndarray, prob: float) -> tuple[VadEvent, ...] | list[VadEvent]:
        """Advance the state machine by one scored window (the LSTM state is stored by the caller). Most
        windows give no event: they return the shared empty tuple, not a new list (issue 14)."""
        start = self.processed
        end = self.processed = start + WINDOW
        self._hist.append(window)
        if not self._in_speech:
            if prob < self._threshold:
                self._trim()
                return _NO_EVENTS
            self._in_speech = True
            self._onset = start
            self._start = max(start - self._pad, self._hist_start, self._floor)
            self._silence_start = None
            self._speech_end = end
            return [VadSpeechStart(self._start, start)]
        if prob >= self._threshold:
            self._silence_start = None
            self._speech_end = end
        elif prob < self._neg_threshold and self._silence_start is None:
            self._silence_start = start
        # Silero's hysteresis: the silence timer runs from the first window below neg_threshold and
        # only a window at/above threshold resets it; the segment ends where speech did.
        if self._silence_start is not None and end - self._silence_start >= self._silence:
            return [self._close(self._speech_end)]
        if self._max_speech is not None and end - self._onset >= self._max_speech:
            return [self._close(self._speech_end if self._silence_start is not None else end)]
        return _NO_EVENTS

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
        audio = np.concatenate([w[CONTEXT:] for w in self._hist]) if self._hist else np.zeros(0, np.float32)
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
            probs, self.state = model.run_batch(w[None, :], self.state)
            events.extend(self._accept(w, float(probs[0])))
        return events

    def flush(self) -> list[VadEvent]:
        """Close an open segment now (end of input), ending at its last speech window. A partial window
        (< 32 ms) stays buffered and is not scored."""
        if not self._in_speech:
            return []
        return [self._close(self._speech_end)]


# --- many streams -------------------------------------------------------------------------------


class _StateTable:
    """A bank's streams' LSTM states, one slot (column) each: ``array (2, capacity, 128)``, so that a round's
    states are gathered (``array[:, slots]``) and scattered back in one numpy call each.

    Streams hold this object, never the array: growing replaces the array, and nothing keeps the old one.
    """

    def __init__(self, capacity: int = TABLE_SLOTS) -> None:
        self.array = np.zeros((2, capacity, STATE_WIDTH), np.float32)
        self._free = list(range(capacity - 1, -1, -1))  # pop() hands out the lowest slot first

    def acquire(self, state: np.ndarray) -> int:
        """A free slot holding ``state`` (2, 1, 128); the table doubles when full."""
        if not self._free:
            old = self.array
            capacity = old.shape[1]
            self.array = np.zeros((2, 2 * capacity, STATE_WIDTH), np.float32)
            self.array[:, :capacity] = old
            self._free = list(range(2 * capacity - 1, capacity - 1, -1))
        slot = self._free.pop()
        self.array[:, slot : slot + 1] = state
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)


class VadRound:
    """One window from each of a round's streams, as `VadBank.take_round` gives them: parallel lists of the
    streams' ids, the streams and their (576,) windows (views of the streams' buffers), and ``slots``, the
    streams' columns of the bank's state table (``VadBank.state_table[:, slots]`` are the round's states)."""

    __slots__ = ("_epoch", "ids", "slots", "streams", "windows")

    def __init__(self, ids: list[Hashable], streams: list[VadStream], windows: list[np.ndarray],
                 slots: np.ndarray, epoch: int) -> None:
        self.ids, self.streams, self.windows, self.slots = ids, streams, windows, slots
        self._epoch = epoch  # the bank's count of streams gone when the round was taken

    def __len__(self) -> int:
        return len(self.ids)

    def stacked(self) -> np.ndarray:
        """The windows as one ``(B, 576)`` array (one copy per window, in one numpy call)."""
        return np.concatenate(self.windows).reshape(len(self.windows), CONTEXT + WINDOW)


class VadBank:
    """Many `VadStream`s scored together: each `process` round makes ONE ``run_batch`` call over every
    stream with a full window, so hundreds of real-time streams share one core.

    ``max_batch`` caps the rows per call; None = no cap. With the batched graph 256-row calls cost
    ~10% less per window than 1024-row ones (smaller intermediates stay in cache; bench/vad_streams.py).

    The streams' LSTM states are kept in the bank's table (`state_table`, ``table_slots`` streams before it
    grows) while they are in the bank: a stream that leaves it (`detach`, `remove_stream`) takes its state
    back (`VadStream.state`).
    """

    def __init__(self, model: SileroModel | None = None, max_batch: int | None = 256, *,
                 scan_all: bool = False, table_slots: int = TABLE_SLOTS) -> None:
        self.model = model if model is not None else SileroModel()
        self.max_batch = max_batch
        self.scan_all = scan_all  # True: every round checks every stream (before issue 14; for benchmarks)
        self._streams: dict[Hashable, VadStream] = {}
        self._rank: dict[Hashable, int] = {}  # insertion order of the streams (rounds go in this order)
        self._next_rank = itertools.count()
        self._table = _StateTable(table_slots)
        # Streams pushed to since their windows were last all scored: a round looks at these only, not at
        # every stream (of a thousand open sessions, a few dozen have new audio at a 10 ms tick).
        self._pushed: dict[Hashable, VadStream] = {}
        # Rank of the last stream a capped round took (None: the last round took every ready stream), so
        # the next round starts after it and no stream waits behind others' backlog.
        self._resume_after: int | None = None
        # Streams that left (removed, detached) so far: a round taken since none left needs no per-stream
        # check when it comes back, and its states go back to the slots it was taken with.
        self._gone = 0

    @property
    def state_table(self) -> np.ndarray:
        """The streams' LSTM states, ``(2, capacity, 128)`` (a round's are ``[:, round.slots]``). Replaced
        when the table grows: read it again after adding streams."""
        return self._table.array

    def add_stream(self, stream_id: Hashable, params: VadParams | None = None) -> VadStream:
        """A new stream; push its audio with `push` (the bank scores what was pushed through it)."""
        if stream_id in self._streams:
            raise KeyError(f"stream {stream_id!r} already exists")
        stream = VadStream(params)
        stream._join(self._table)
        self._streams[stream_id] = stream
        self._rank[stream_id] = next(self._next_rank)
        return stream

    def remove_stream(self, stream_id: Hashable) -> None:
        stream = self._streams.pop(stream_id, None)
        self._rank.pop(stream_id, None)
        self._pushed.pop(stream_id, None)
        if stream is not None:
            self._gone += 1
            stream._leave()  # its slot is free for the next stream (a round in flight skips this one)

    def detach(self, stream_id: Hashable) -> VadStream:
        """Take a stream out of the batched rounds (to score it elsewhere, e.g. in a thread); `attach` puts
        it back. Its state leaves the bank's table with it."""
        stream = self._streams.pop(stream_id)
        self._rank.pop(stream_id, None)
        self._pushed.pop(stream_id, None)
        self._gone += 1
        stream._leave()
        return stream

    def attach(self, stream_id: Hashable, stream: VadStream) -> None:
        if stream_id in self._streams:
            raise KeyError(f"stream {stream_id!r} already exists")
        stream._join(self._table)
        self._streams[stream_id] = stream
        self._rank[stream_id] = next(self._next_rank)
        self._pushed[stream_id] = stream

    def stream(self, stream_id: Hashable) -> VadStream:
        return self._streams[stream_id]

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._streams

    def __len__(self) -> int:
        return len(self._streams)

    def push(self, stream_id: Hashable, samples: np.ndarray | Iterable[float]) -> None:
        """Buffer samples for one stream; scoring happens in `process`."""
        stream = self._streams[stream_id]
        stream.push(samples)
        self._pushed[stream_id] = stream

    def samples_until_window(self, stream_id: Hashable) -> int:
        """`VadStream.samples_until_window` of the stream; 0 for a stream not in the bank."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else stream.samples_until_window

    def process(self) -> list[tuple[Hashable, VadEvent]]:
        """Score all full windows, one batched call per round, until no stream has a full window.
        Events of one stream come in time order; within a round, in stream insertion order."""
        events: list[tuple[Hashable, VadEvent]] = []
        while group := self.take_round():
            events += self.finish_round(group, *self.score_round(group))
        return events

    def score_round(self, group: VadRound) -> tuple[np.ndarray, np.ndarray]:
        """A round's ``(probs, states)`` from this process's model (`duplex.vad_worker` does the same apart)."""
        return self.model.run_batch(group.stacked(), self._table.array[:, group.slots])

    def take_round(self, max_rows: int | None = None) -> VadRound:
        """The next round: one window from each stream that has one (at most ``max_rows``, else
        ``max_batch``), in stream insertion order; each must come back through `finish_round` before that
        stream's next round. The model may run anywhere meanwhile (`duplex.vad_worker`)."""
        rank = self._rank
        # (rank, id, stream) of each stream with a full window (the test inlines `windows_ready`: it runs for
        # every stream pushed to, every round); ranks are unique, so sorting compares them alone
        if self.scan_all:
            ready = [(rank[sid], sid, s) for sid, s in self._streams.items() if s._end - s._pos >= WINDOW]
        else:
            ready = sorted([(rank[sid], sid, s) for sid, s in self._pushed.items() if s._end - s._pos >= WINDOW])
        # Every ready stream stays marked: it may hold more windows than this round takes.
        self._pushed = {sid: s for _, sid, s in ready}
        cap = max_rows or self.max_batch or len(ready)
        if self._resume_after is not None:  # the last capped round stopped there: the streams after it go first
            after = self._resume_after
            first = next((i for i, (r, _, _) in enumerate(ready) if r > after), 0)
            ready = ready[first:] + ready[:first]
        self._resume_after = ready[cap - 1][0] if len(ready) > cap else None
        if len(ready) > cap:
            ready = ready[:cap]
        ids = [sid for _, sid, _ in ready]
        taken = [s for _, _, s in ready]
        return VadRound(ids, taken, [s._take_window() for s in taken],
                        np.fromiter([s._slot for s in taken], np.intp, len(taken)), self._gone)

    def finish_round(self, group: VadRound, probs: np.ndarray, states: np.ndarray) -> list[tuple[Hashable, VadEvent]]:
        """Advance each stream of a round by its window's probability ``probs[j]``; its new state
        ``states[:, j]`` goes to its slot. A stream removed (or replaced, or detached) since `take_round` is
        skipped."""
        ids, taken, windows = group.ids, group.streams, group.windows
        if group._epoch == self._gone:  # every stream of the round is still here, in the slot it was taken from
            self._table.array[:, group.slots] = states
        else:
            streams = self._streams
            keep = [j for j, (sid, s) in enumerate(zip(ids, taken)) if streams.get(sid) is s]
            ids, taken, windows = [ids[j] for j in keep], [taken[j] for j in keep], [windows[j] for j in keep]
            probs = probs[keep]
            # re-attached streams have other slots now
            self._table.array[:, np.array([s._slot for s in taken], np.intp)] = states[:, keep]
        events: list[tuple[Hashable, VadEvent]] = []
        for sid, s, w, p in zip(ids, taken, windows, probs.tolist()):
            for ev in s._accept(w, p):  # floats from tolist(): the same values as float(probs[j])
                events.append((sid, ev))
        return events

    def has_pending(self) -> bool:
        """Whether a stream pushed to may have a window to score (a cheap check: `take_round` decides)."""
        return bool(self._pushed) or self.scan_all

    def flush(self, stream_id: Hashable) -> list[VadEvent]:
        """Score the stream's remaining full windows on their own, then close its open segment."""
        stream = self._streams[stream_id]
        return stream.process(self.model) + stream.flush()
