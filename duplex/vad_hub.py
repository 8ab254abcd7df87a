"""All sessions' VAD streams on one event loop: pushes gathered into batched rounds, scored in-process or by
a worker process (`duplex.vad_worker`).

A round takes one 32 ms window from every stream that has one and scores them in one model call. In-process,
the call runs on the event loop (as before issue 14). With a worker, the loop only copies the windows and the
streams' LSTM states (gathered from the bank's state table, `duplex.vad.VadBank.state_table`) into shared
memory and goes on serving sessions; the reply is read when the worker's pipe is readable, and its
events reach the sessions' sinks in the same order as in-process rounds give them. One round is in flight
at a time (a window's state is the next window's input). Anything that must see a stream's state at once (a
flush, a stream scored in a thread) first waits for the round in flight: at most one model call, ~1 ms.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import numpy as np

from .vad import SileroModel, VadBank, VadEvent, VadParams, VadRound
from .vad_worker import VadWorker, VadWorkerError

log = logging.getLogger(__name__)

# Runs fn(*args) off the event loop and returns its result (the server passes its bounded executor).
RunBlocking = Callable[..., Awaitable[Any]]

# A worker that dies (or fails to start) is replaced after these delays, one per loss; past the last the loop
# scores for good: a worker that keeps dying is a broken install, which a new process would not fix.
WORKER_RESTART_DELAYS_S = (1.0, 10.0, 60.0)


class VadHub:
    """One silero model and one `VadBank` shared by all sessions: whoever pushes audio runs a batched
    ONNX call over every stream with a window ready, so hundreds of sessions share a core.

    With few streams the call runs on the next event-loop turn (no added latency). From
    ``coalesce_from`` streams on, pushes are gathered for ``coalesce_s`` first: sessions push at
    different moments, so one loop turn holds only a few windows, and a batch of one costs as much
    as a batch of dozens (the batched graph pays off from ~16 rows; bench/vad_streams.py).

    `start_worker` (the server calls it at startup) moves the model calls to a child process; until it is
    ready, and while a lost worker's replacement starts (`WORKER_RESTART_DELAYS_S`), rounds are scored
    in-process."""

    def __init__(self, model: SileroModel | None = None, coalesce_from: int = 16,
                 coalesce_s: float = 0.010, *, scan_all: bool = False) -> None:
        self._bank = VadBank(model or SileroModel(), scan_all=scan_all)
        self._sinks: dict[Hashable, Callable[[VadEvent], None]] = {}
        self._detached: dict[Hashable, Any] = {}  # streams being scored in a thread (push_offloaded)
        self._scheduled = False
        self.coalesce_from = coalesce_from
        self.coalesce_s = coalesce_s
        self._worker: VadWorker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._round: VadRound | None = None  # the round the worker is scoring
        self.restart_delays_s: tuple[float, ...] = WORKER_RESTART_DELAYS_S
        self._restarts = 0  # workers started to replace lost ones
        self._restart: asyncio.TimerHandle | None = None
        self._closed = False

    # the worker ----------------------------------------------------------------------------------

    def start_worker(self) -> None:
        """Spawn the worker process (from the running event loop); rounds go to it once it is ready."""
        if self._worker is not None:
            return
        self._loop = asyncio.get_running_loop()
        worker = VadWorker(graph=self._bank.model.graph, model_path=self._bank.model.path)
        worker.start()
        self._worker = worker
        self._loop.add_reader(worker.fileno(), self._on_worker)

    @property
    def worker_pid(self) -> int | None:
        return None if self._worker is None else self._worker.pid

    @property
    def worker_ready(self) -> bool:
        return self._worker is not None and self._worker.ready

    def close(self) -> None:
        """Stop the worker (a round in flight is scored in-process first); no replacement is started."""
        self._closed = True
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        self._settle()
        worker, self._worker = self._worker, None
        if worker is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(worker.fileno())
            worker.close()

    def _on_worker(self) -> None:
        """The worker's pipe is readable: its start message, or the reply to the round in flight."""
        worker = self._worker
        if worker is None:
            return
        try:
            if not worker.ready:
                worker.on_started()
                log.info("VAD worker ready (pid %s, %s graph)", worker.pid, worker.graph)
                return
            if self._round is None:
                # Nothing asked: either _settle already read the reply this readiness was for, or the worker
                # ended (the pipe reads EOF, and would stay readable: the loop would call us forever).
                worker.check_quiet()
                return
            reply = worker.reply()
        except VadWorkerError as exc:
            self._lose_worker(exc)
            return
        if reply is not None:
            self._finish(reply)

    def _lose_worker(self, exc: Exception) -> None:
        loop = self._loop
        again = loop is not None and not self._closed and self._restarts < len(self.restart_delays_s)
        if again:
            delay = self.restart_delays_s[self._restarts]
            self._restarts += 1
            log.error("%s; the VAD runs on the event loop until a new worker is ready (starting in %g s, "
                      "replacement %d of %d)", exc, delay, self._restarts, len(self.restart_delays_s))
        else:
            log.error("%s; the VAD runs on the event loop from now on", exc)
        worker, self._worker = self._worker, None
        if worker is not None:
            if loop is not None:
                loop.remove_reader(worker.fileno())
            worker.close()
        group, self._round = self._round, None
        if group is not None:  # its windows were taken: score them here
            self._dispatch(self._bank.finish_round(group, *self._bank.score_round(group)))
        if again:
            assert loop is not None
            self._restart = loop.call_later(delay, self._replace_worker)
        self._process()

    def _replace_worker(self) -> None:
        self._restart = None
        if self._closed or self._worker is not None:
            return
        try:
            self.start_worker()
        except (OSError, VadWorkerError) as exc:  # could not even spawn (fds, memory): counts as a loss
            self._lose_worker(VadWorkerError(f"the VAD worker could not be started again: {exc}"))

    def _hand_out(self, reply: tuple[np.ndarray, np.ndarray]) -> VadRound:
        """Advance the round in flight's streams by the worker's reply and send their events on."""
        group, self._round = self._round, None
        assert group is not None
        self._dispatch(self._bank.finish_round(group, *reply))
        return group

    def _finish(self, reply: tuple[np.ndarray, np.ndarray]) -> None:
        group = self._hand_out(reply)
        if self._bank.has_pending() and not self._scheduled:
            # Windows left: a stream's backlog (more than one window per push) goes at once; pushes that came
            # while the worker scored are gathered as any other.
            self._schedule(backlog=any(s.windows_ready for s in group.streams))

    def _settle(self) -> None:
        """Wait for the round in flight (if any) and hand out its events: a stream's state is then current."""
        if self._round is None:
            return
        assert self._worker is not None
        try:
            reply = self._worker.reply(block=True)
        except VadWorkerError as exc:
            self._lose_worker(exc)
            return
        assert reply is not None
        self._hand_out(reply)

    # streams -------------------------------------------------------------------------------------

    def add(self, stream_id: Hashable, params: VadParams, sink: Callable[[VadEvent], None]) -> None:
        self._detached.pop(stream_id, None)
        self._bank.add_stream(stream_id, params)
        self._sinks[stream_id] = sink

    def remove(self, stream_id: Hashable) -> None:
        # A round in flight skips a removed stream (VadBank.finish_round checks the stream is still there).
        self._bank.remove_stream(stream_id)
        self._sinks.pop(stream_id, None)
        self._detached.pop(stream_id, None)

    def push(self, stream_id: Hashable, samples: np.ndarray) -> None:
        """Buffer audio; all streams pushed during one event-loop turn are scored in one batched call
        at the start of the next turn (one call per push would score one window at a time)."""
        if stream_id not in self._sinks:
            return
        self._bank.push(stream_id, samples)
        if self._scheduled:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no event loop (scripts, pure tests): score now
            self._process()
            return
        self._schedule()

    def _schedule(self, backlog: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._scheduled = True
        if backlog or len(self._sinks) < self.coalesce_from:
            loop.call_soon(self._process)
        else:
            loop.call_later(self.coalesce_s, self._process)

    def _process(self) -> None:
        self._scheduled = False
        worker = self._worker
        if worker is None or not worker.ready:
            self._dispatch(self._bank.process())
            return
        if self._round is not None:  # the worker's reply starts the next round
            return
        group = self._bank.take_round(worker.rows)
        if not group:
            return
        try:
            worker.submit(group.windows, self._bank.state_table, group.slots)
        except VadWorkerError as exc:
            self._round = group
            self._lose_worker(exc)
            return
        self._round = group

    def _dispatch(self, events: list[tuple[Hashable, VadEvent]]) -> None:
        for sid, event in events:
            sink = self._sinks.get(sid)
            if sink is not None:
                sink(event)

    async def push_offloaded(self, stream_id: Hashable, samples: np.ndarray, run: RunBlocking) -> None:
        """`push` for a long stretch (seconds of audio at once): the stream is taken out of the batched
        rounds and scored through `run` (a thread pool), so the event loop serves other sessions meanwhile.
        Its events then go to its sink, in order; the caller pushes nothing else to it until this returns."""
        if stream_id not in self._sinks:
            return
        self._settle()  # its window in flight (if any) is scored first
        stream = self._bank.detach(stream_id)
        self._detached[stream_id] = stream
        try:
            stream.push(samples)
            events = await run(stream.process, self._bank.model)
        except BaseException:
            # Cancelled (the session is closing) or failed: the thread may still hold the stream, so it is
            # not put back; a failure leaves the session a fresh stream.
            if self._detached.pop(stream_id, None) is stream and stream_id in self._sinks:
                self._bank.add_stream(stream_id, stream.params)
            raise
        if self._detached.get(stream_id) is not stream:  # removed (session closed) meanwhile
            return
        del self._detached[stream_id]
        self._bank.attach(stream_id, stream)
        sink = self._sinks.get(stream_id)
        for event in events:
            if sink is not None:
                sink(event)

    def samples_until_window(self, stream_id: Hashable) -> int:
        """Samples still to push to the stream before it holds one more full 512-sample window than now
        (windows in the round in flight count as scored): `duplex.vad.VadStream.samples_until_window`. 0 for
        a stream the hub does not know or that is being scored in a thread (`push_offloaded`)."""
        return self._bank.samples_until_window(stream_id)

    def held_bytes(self, stream_id: Hashable) -> int:
        """Audio the stream holds (buffered input, the open segment)."""
        stream = self._detached.get(stream_id)
        if stream is None and stream_id in self._bank:
            stream = self._bank.stream(stream_id)
        return 0 if stream is None else stream.held_bytes()

    def flush(self, stream_id: Hashable) -> list[VadEvent]:
        """End the stream's speech now (a manual commit); the events also go to its sink."""
        if stream_id not in self._sinks:
            return []
        self._settle()
        if self._worker is None or not self._worker.ready:
            self._process()  # windows already buffered come first
        events = self._bank.flush(stream_id)  # the stream's remaining windows, scored here
        for event in events:
            self._sinks[stream_id](event)
        return events
