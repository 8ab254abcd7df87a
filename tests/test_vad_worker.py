"""The VAD's model in a worker process (issue 14): the same events as on the event loop, whatever happens to it.

Real child processes, real shared memory, the real Silero graph. The reference is the in-process hub fed the
same pushes at the same event-loop turns."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from duplex.vad import SileroModel, VadBank, VadEvent, VadParams, VadSpeechEnd, VadStream
from duplex.vad_hub import VadHub
from duplex.vad_worker import VadWorker, VadWorkerError
from tests.speech import load_beckett

STREAMS = 24  # above VadHub.coalesce_from: rounds are gathered as under load
CHUNK = 320  # 20 ms at 16 kHz, a client's usual append
PARAMS = VadParams(silence_duration_ms=300, min_speech_ms=150)


@pytest.fixture(scope="module")
def model() -> SileroModel:
    return SileroModel()


@pytest.fixture(scope="module")
def audio() -> list[np.ndarray]:
    """A different stretch of real speech per stream (offsets in 0.25 s steps), 6 s each."""
    beckett = load_beckett()
    return [beckett[i * 4000 : i * 4000 + 96_000] for i in range(STREAMS)]


async def _drive(hub: VadHub, audio: list[np.ndarray], *, on_step=None) -> dict[int, list[VadEvent]]:
    """Push every stream's audio 20 ms at a time, one loop turn between pushes, as sessions do."""
    got: dict[int, list[VadEvent]] = {i: [] for i in range(len(audio))}
    for i in range(len(audio)):
        hub.add(i, PARAMS, got[i].append)
    steps = len(audio[0]) // CHUNK
    for step in range(steps):
        for i, clip in enumerate(audio):
            hub.push(i, clip[step * CHUNK : (step + 1) * CHUNK])
            if i % 6 == 0:
                await asyncio.sleep(0)
        if on_step is not None:
            on_step(step)
        await asyncio.sleep(0.002)
    for _ in range(200):  # let the last rounds come back
        await asyncio.sleep(0.005)
    return got


def _alone(model: SileroModel, clip: np.ndarray) -> list[VadEvent]:
    stream = VadStream(PARAMS)
    stream.push(clip)
    return stream.process(model)


def _assert_same(got: dict[int, list[VadEvent]], want: dict[int, list[VadEvent]]) -> None:
    assert got.keys() == want.keys()
    for sid, events in want.items():
        assert got[sid] == events, sid  # types and sample numbers
        for a, b in zip(got[sid], events):
            if isinstance(a, VadSpeechEnd):
                np.testing.assert_array_equal(a.audio, b.audio)


async def _started(hub: VadHub) -> None:
    hub.start_worker()
    for _ in range(1200):
        if hub.worker_ready:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the VAD worker did not start")


async def test_worker_gives_the_events_of_each_stream_alone(model: SileroModel, audio) -> None:
    want = {i: _alone(model, clip) for i, clip in enumerate(audio)}
    assert all(segs for segs in want.values()), "every stretch of speech has a segment"
    hub = VadHub(model)
    await _started(hub)
    assert hub.worker_pid is not None and hub.worker_pid != os.getpid()
    calls = []
    original = model.run_batch
    model.run_batch = lambda *a: calls.append(1) or original(*a)  # type: ignore[method-assign]
    try:
        got = await _drive(hub, audio)
    finally:
        del model.run_batch
        hub.close()
    _assert_same(got, want)
    assert calls == [], "no window was scored in the server process"


async def test_a_killed_worker_hands_its_round_back(model: SileroModel, audio) -> None:
    want = {i: _alone(model, clip) for i, clip in enumerate(audio)}
    hub = VadHub(model)
    hub.restart_delays_s = ()  # no replacement
    await _started(hub)

    def kill(step: int) -> None:
        if step == 40:  # mid-speech, a round probably in flight
            os.kill(hub.worker_pid, signal.SIGKILL)

    try:
        got = await _drive(hub, audio, on_step=kill)
        assert not hub.worker_ready  # gone for good: the loop scores from now on
    finally:
        hub.close()
    _assert_same(got, want)


async def test_a_lost_worker_is_replaced_while_the_loop_scores(model: SileroModel, audio) -> None:
    """Killed mid-stream, the worker is replaced after the restart delay (meanwhile the loop scores); the new
    one scores the rest, with the events of each stream alone; once the replacements are spent, the loop
    scores for good."""
    want = {i: _alone(model, clip) for i, clip in enumerate(audio)}
    hub = VadHub(model)
    hub.restart_delays_s = (0.05,)
    await _started(hub)
    first = hub.worker_pid
    pids: list[int | None] = []

    def kill(step: int) -> None:
        if step == 20:
            os.kill(hub.worker_pid, signal.SIGKILL)
        pids.append(hub.worker_pid if hub.worker_ready else None)

    try:
        got = await _drive(hub, audio, on_step=kill)
        for _ in range(1200):
            if hub.worker_ready:
                break
            await asyncio.sleep(0.05)
        second = hub.worker_pid
        assert hub.worker_ready and second not in (None, first)
        assert None in pids[20:], "the loop scored while the replacement started"
        os.kill(second, signal.SIGKILL)  # no replacement left
        for _ in range(200):
            if not hub.worker_ready:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert not hub.worker_ready and hub.worker_pid is None
    finally:
        hub.close()
    _assert_same(got, want)


async def test_flush_and_remove_while_a_round_is_in_flight(model: SileroModel, audio) -> None:
    clip = audio[0][:48_000]
    stream = VadStream(PARAMS)
    stream.push(clip)
    want = stream.process(model) + stream.flush()
    hub = VadHub(model, coalesce_from=1, coalesce_s=0.0)
    hub.restart_delays_s = ()
    await _started(hub)
    got: list[VadEvent] = []
    try:
        hub.add("a", PARAMS, got.append)
        hub.add("b", PARAMS, lambda e: None)
        flushed = []
        for k in range(0, clip.size, CHUNK):
            hub.push("a", clip[k : k + CHUNK])
            hub.push("b", clip[k : k + CHUNK])
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # the round is submitted; its reply may not be in yet
        hub.remove("b")  # its window in flight is dropped when the reply comes
        flushed = hub.flush("a")
        await asyncio.sleep(0.2)
    finally:
        hub.close()
    assert got == want
    assert flushed and flushed[-1] == want[-1]


async def test_a_stream_scored_in_a_thread_waits_for_its_window_in_flight(model: SileroModel, audio) -> None:
    from concurrent.futures import ThreadPoolExecutor

    clip = audio[1]
    want = _alone(model, clip)
    hub = VadHub(model, coalesce_from=1, coalesce_s=0.0)
    await _started(hub)
    got: list[VadEvent] = []
    pool = ThreadPoolExecutor(1)

    async def run(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    try:
        hub.add("a", PARAMS, got.append)
        hub.push("a", clip[:16_000])
        await asyncio.sleep(0)  # a round in flight
        await hub.push_offloaded("a", clip[16_000:80_000], run)
        hub.push("a", clip[80_000:])
        await asyncio.sleep(0.3)
    finally:
        hub.close()
        pool.shutdown()
    assert got == want


def test_worker_rounds_equal_in_process_calls(model: SileroModel, audio) -> None:
    shm = Path("/dev/shm")
    before = set(shm.glob("vita-vad-*")) if shm.is_dir() else set()
    worker = VadWorker(graph=model.graph, model_path=model.path)
    worker.start()
    assert (set(shm.glob("vita-vad-*")) if shm.is_dir() else set()) == before, "the shared file has no name"
    try:
        worker.wait_started()
        assert worker.graph == model.graph
        rng = np.random.default_rng(0)
        table = rng.standard_normal((2, 2 * worker.rows, 128)).astype(np.float32)  # a bank's state table
        for b in (1, 7, worker.rows):
            windows = [rng.standard_normal(576).astype(np.float32) * 0.1 for _ in range(b)]
            slots = rng.permutation(table.shape[1])[:b]  # the round's streams' slots, in no order
            worker.submit(windows, table, slots)
            with pytest.raises(VadWorkerError):
                worker.submit(windows, table, slots)  # one round at a time
            probs, new_states = worker.reply(block=True)
            want_p, want_s = model.run_batch(np.stack(windows), table[:, slots])
            np.testing.assert_array_equal(probs, want_p)
            np.testing.assert_array_equal(new_states, want_s)
            worker.submit(windows, np.ascontiguousarray(table[:, slots]))  # the round's states themselves
            probs, new_states = worker.reply(block=True)
            np.testing.assert_array_equal(probs, want_p)
            np.testing.assert_array_equal(new_states, want_s)
        with pytest.raises(VadWorkerError):
            worker.submit([np.zeros(576, np.float32)] * (worker.rows + 1), table, np.arange(worker.rows + 1))
    finally:
        worker.close()
    assert not worker.alive


def test_a_worker_that_cannot_load_the_model_says_why(tmp_path) -> None:
    bad = tmp_path / "not_a_model.onnx"
    bad.write_bytes(b"not onnx")
    worker = VadWorker(graph="stock", model_path=bad)
    worker.start()
    try:
        with pytest.raises(VadWorkerError, match="failed to start"):
            worker.wait_started()
    finally:
        worker.close()


async def test_a_worker_that_dies_between_rounds_is_noticed_at_once(model: SileroModel, audio) -> None:
    """Killed with no round in flight, its pipe reads EOF: the hub lets it go (instead of being woken for the
    readable pipe over and over) and the loop scores what comes next."""
    hub = VadHub(model, coalesce_from=1, coalesce_s=0.0)
    await _started(hub)
    got: list[VadEvent] = []
    try:
        os.kill(hub.worker_pid, signal.SIGKILL)
        for _ in range(200):
            if not hub.worker_ready:
                break
            await asyncio.sleep(0.01)
        assert not hub.worker_ready
        hub.add("a", PARAMS, got.append)
        hub.push("a", audio[2])
        await asyncio.sleep(0.1)
    finally:
        hub.close()
    assert got == _alone(model, audio[2])


async def _drive_with_changes(hub: VadHub, audio: list[np.ndarray]) -> dict[str, list[VadEvent]]:
    """`_drive` while streams come and go: stream 5 replaced (a new stream under its id, fed from there on),
    stream 7 removed for good, six streams added halfway (reusing the freed slot, growing the state table),
    some of it likely while a round is in flight. Events by stream (a replacement under a name of its own)."""
    got: dict[str, list[VadEvent]] = {}

    def add(sid: int, name: str) -> None:
        got[name] = []
        hub.add(sid, PARAMS, got[name].append)

    for i in range(len(audio) - 6):
        add(i, str(i))
    for step in range(len(audio[0]) // CHUNK):
        if step == 30:
            hub.remove(5)
            add(5, "5 from 30")
        elif step == 40:
            hub.remove(7)
        elif step == 50:
            for i in range(len(audio) - 6, len(audio)):
                add(i, f"{i} from 50")
        for i, clip in enumerate(audio):
            hub.push(i, clip[step * CHUNK : (step + 1) * CHUNK])
            if i % 6 == 0:
                await asyncio.sleep(0)
        await asyncio.sleep(0.002)
    for _ in range(200):
        await asyncio.sleep(0.005)
    return got


async def test_worker_and_event_loop_give_the_same_events_as_streams_come_and_go(model: SileroModel, audio) -> None:
    """The state table under both paths: the worker's rounds (states gathered into shared memory by slot) and
    the loop's give identical events, each stream's those of its audio alone, with streams replaced, removed
    and added mid-run and the table growing from 4 slots."""
    clips = audio + [np.roll(clip, 48_000) for clip in audio[:6]]
    runs = []
    for use_worker in (False, True):
        hub = VadHub(model)
        hub._bank = VadBank(model, table_slots=4)
        try:
            if use_worker:
                await _started(hub)
            runs.append(await _drive_with_changes(hub, clips))
            assert hub._bank.state_table.shape[1] >= len(clips) - 1
        finally:
            hub.close()
    in_loop, in_worker = runs
    _assert_same(in_worker, in_loop)
    start = {"5 from 30": 30 * CHUNK, **{f"{i} from 50": 50 * CHUNK for i in range(len(clips) - 6, len(clips))}}
    for name, events in in_loop.items():
        sid = int(name.split()[0])
        if name in ("5", "7"):  # removed: their windows pending then were dropped
            continue
        assert events == _alone(model, clips[sid][start.get(name, 0) :]), name
    assert sum(isinstance(e, VadSpeechEnd) for events in in_loop.values() for e in events) >= 20
