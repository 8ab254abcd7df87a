"""The VAD's model calls in a process of their own (issue 14): the server's event loop only copies windows in.

The Silero graph costs ~30 us of CPU per 32 ms window, about a fifth of what a realtime session costs the
server's one process (bench/RESULTS.md, issue 14), and it is pure arithmetic on arrays: nothing in it needs
the event loop. `VadWorker` runs it in a child process, started with "spawn" (the server has threads and
vLLM's engines by then; forking those is unsafe), single-threaded as in the server.

Data crosses in one shared-memory file and a pipe carries one small message per round:

* the parent writes a round's windows ``(B, 576)`` and LSTM states ``(2, B, 128)`` into the file's input
  area and sends ``B``: each with one numpy call (the windows concatenated from the streams' buffers, the
  states gathered from the bank's state table by the round's slots, `duplex.vad.VadBank.state_table`);
* the child runs the graph, writes the probabilities ``(B,)`` and the new states ``(2, B, 128)`` into the
  output area and answers ``OK`` (or the error's text); the parent scatters the states back into its table
  (one numpy call) and reads the probabilities as one list;
* one round is in flight at a time (a stream's next window needs this window's state), so the areas are
  never written while the other side reads them.

The parent never blocks on the child in the normal course: the pipe's end is watched by the event loop
(`fileno`), and `reply` is called when it is readable. `reply(block=True)` (a flush, a manual commit) waits
for it. A child that dies or fails raises `VadWorkerError`; the caller scores the round in-process.

The shared file is created in /dev/shm where it exists and unlinked at once; the child gets its descriptor
through the pipe (a Unix socket pair), so nothing is left behind however either process ends.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import multiprocessing
import os
import struct
import tempfile
from multiprocessing import reduction
from multiprocessing.connection import Connection

import numpy as np

from .vad import CONTEXT, WINDOW

log = logging.getLogger(__name__)

ROW = CONTEXT + WINDOW  # floats per window row: the model's 64 context samples + 512 new ones
STATE_ROW = 2 * 128  # floats of LSTM state per stream (2 x 128)
# Rows per round the shared areas hold: the VAD bank's default batch cap (duplex.vad.VadBank.max_batch,
# 256: larger calls cost more per window); 256 rows take 1.3 MiB of shared memory.
MAX_ROWS = 256
START_TIMEOUT_S = 60.0  # the child imports numpy and onnxruntime and rewrites the graph: ~1-2 s, more when busy
PROCESS_NAME = b"vita-vad"  # the child's name in ps/top (and how bench/load.py tells its CPU apart)
_OK = b"OK"
_HEADER = struct.Struct("<I")


class VadWorkerError(RuntimeError):
    """The worker process failed a round or is gone; its rounds must be scored in-process."""


def _layout(rows: int) -> tuple[int, int, int, int]:
    """Byte offsets of (input windows, input states, output probs, output states) and the total size."""
    f = 4  # float32
    windows = 0
    states = windows + rows * ROW * f
    probs = states + rows * STATE_ROW * f
    out_states = probs + rows * f
    return windows, states, probs, out_states


def _size(rows: int) -> int:
    return _layout(rows)[3] + rows * STATE_ROW * 4


class _Areas:
    """numpy views of the shared file for a round of B rows (each area C-contiguous for that B)."""

    def __init__(self, buf: mmap.mmap, rows: int) -> None:
        self._buf, self._rows = buf, rows
        self._offsets = _layout(rows)

    def windows(self, b: int) -> np.ndarray:
        return np.ndarray((b, ROW), np.float32, buffer=self._buf, offset=self._offsets[0])

    def windows_flat(self, b: int) -> np.ndarray:
        """The same area as `windows`, ``(B * 576,)``: what the rows are concatenated into."""
        return np.ndarray((b * ROW,), np.float32, buffer=self._buf, offset=self._offsets[0])

    def states(self, b: int) -> np.ndarray:
        return np.ndarray((2, b, 128), np.float32, buffer=self._buf, offset=self._offsets[1])

    def probs(self, b: int) -> np.ndarray:
        return np.ndarray((b,), np.float32, buffer=self._buf, offset=self._offsets[2])

    def out_states(self, b: int) -> np.ndarray:
        return np.ndarray((2, b, 128), np.float32, buffer=self._buf, offset=self._offsets[3])


class VadWorker:
    """A child process scoring the VAD's batched rounds. Not thread-safe: drive it from the event loop."""

    def __init__(self, graph: str = "batched", model_path: str | os.PathLike[str] | None = None,
                 rows: int = MAX_ROWS) -> None:
        self.rows = rows
        self._graph, self._model_path = graph, model_path
        self._conn: Connection | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._buf: mmap.mmap | None = None
        self._areas: _Areas | None = None
        self._in_flight = 0  # rows of the round submitted and not yet answered (0: none)
        self.ready = False  # the child answered its start message
        self.graph: str | None = None  # which graph the child runs, once ready

    # lifecycle -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the child; `fileno` becomes readable when it is ready (then call `on_started`)."""
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        fd, path = tempfile.mkstemp(prefix="vita-vad-", dir=shm_dir)
        try:
            os.unlink(path)  # nameless from the start: nothing to leave behind however either process ends
            os.ftruncate(fd, _size(self.rows))
            self._buf = mmap.mmap(fd, _size(self.rows))
            self._areas = _Areas(self._buf, self.rows)
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe(duplex=True)  # a Unix socket pair: it can carry the file descriptor
            self._proc = ctx.Process(target=_serve, args=(child, self.rows, self._graph, None if self._model_path
                                                          is None else str(self._model_path)),
                                     name="vita-vad", daemon=True)
            self._proc.start()
            child.close()
            self._conn = parent
            reduction.send_handle(parent, fd, self._proc.pid)
        finally:
            os.close(fd)

    def fileno(self) -> int:
        assert self._conn is not None
        return self._conn.fileno()

    def on_started(self) -> None:
        """Read the child's start message (call when `fileno` is readable before `ready`)."""
        message = self._recv()
        if not message.startswith(_OK):
            raise VadWorkerError(f"the VAD worker failed to start: {message.decode(errors='replace')}")
        self.graph = message[len(_OK):].decode() or None
        self.ready = True

    def wait_started(self, timeout: float = START_TIMEOUT_S) -> None:
        """Block until the child is ready (scripts and tests; the server uses the event loop instead)."""
        assert self._conn is not None
        if not self._conn.poll(timeout):
            raise VadWorkerError(f"the VAD worker did not start within {timeout:.0f} s")
        self.on_started()

    def close(self) -> None:
        self.ready = False
        if self._conn is not None:
            try:
                self._conn.send_bytes(_HEADER.pack(0))  # 0 rows: the child's cue to exit
            except OSError:
                pass
            self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(timeout=2)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(timeout=2)
            self._proc = None
        self._areas = None  # views of the map go first; a view still held elsewhere keeps the map open
        if self._buf is not None:
            try:
                self._buf.close()
            except BufferError:  # a numpy view is still alive somewhere: the map goes with it
                pass
            self._buf = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    # rounds --------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> bool:
        return self._in_flight > 0

    def submit(self, windows: list[np.ndarray], states: np.ndarray, slots: np.ndarray | None = None) -> None:
        """Start a round: one (576,) window per stream, at most `rows` of them, and their LSTM states:
        ``states[:, slots]`` of a state table ``(2, N, 128)`` (`duplex.vad.VadBank.state_table`), or with no
        ``slots`` the round's ``(2, B, 128)`` states themselves."""
        b = len(windows)
        if not self.ready or self._in_flight or not 0 < b <= self.rows:
            raise VadWorkerError(f"cannot submit {b} rows (ready={self.ready}, in flight={self._in_flight})")
        assert self._areas is not None and self._conn is not None
        np.concatenate(windows, out=self._areas.windows_flat(b))  # each (576,): the rows, one after another
        if slots is None:
            self._areas.states(b)[:] = states
        else:
            np.take(states, slots, axis=1, out=self._areas.states(b))
        try:
            self._conn.send_bytes(_HEADER.pack(b))
        except OSError as exc:
            raise VadWorkerError(f"the VAD worker is gone: {exc}") from None
        self._in_flight = b

    def reply(self, block: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
        """The answer to the round in flight: ``(probs (B,), states (2, B, 128))``, views of shared memory
        valid until the next `submit` (copy what is kept). None when not answered yet and not `block`."""
        b = self._in_flight
        if not b:
            raise VadWorkerError("no round in flight")
        assert self._conn is not None and self._areas is not None
        if not block and not self._conn.poll():
            return None
        self._in_flight = 0
        message = self._recv()
        if message != _OK:
            raise VadWorkerError(f"the VAD worker failed a round: {message.decode(errors='replace')}")
        return self._areas.probs(b), self._areas.out_states(b)

    def check_quiet(self) -> None:
        """With no round in flight the pipe has nothing to say: raise VadWorkerError if it does (the child
        ended, or answered out of turn)."""
        assert self._conn is not None
        if self._conn.poll():
            message = self._recv()  # raises at EOF
            self.ready = False
            raise VadWorkerError(f"the VAD worker spoke out of turn: {message[:100]!r}")

    def _recv(self) -> bytes:
        assert self._conn is not None
        try:
            return self._conn.recv_bytes()
        except (EOFError, OSError) as exc:
            self.ready = False
            raise VadWorkerError(f"the VAD worker is gone ({type(exc).__name__})") from None


# --- the child ----------------------------------------------------------------------------------


def _name_process() -> None:
    """Name the child in ps/top (Linux prctl PR_SET_NAME); harmless elsewhere."""
    try:
        ctypes.CDLL(None).prctl(15, PROCESS_NAME, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _serve(conn: Connection, rows: int, graph: str, model_path: str | None) -> None:
    """The child's loop: map the shared file, load the model, then score rounds until told to stop."""
    _name_process()
    try:
        from .vad import SileroModel  # onnxruntime and the graph rewrite load here, not in the server

        fd = reduction.recv_handle(conn)
        try:
            buf = mmap.mmap(fd, _size(rows))
        finally:
            os.close(fd)
        areas = _Areas(buf, rows)
        model = SileroModel(model_path, graph=graph)  # type: ignore[arg-type]
    except BaseException as exc:  # noqa: BLE001 - report any start failure to the parent
        conn.send_bytes(f"{type(exc).__name__}: {exc}".encode())
        return
    conn.send_bytes(_OK + model.graph.encode())
    while True:
        try:
            (b,) = _HEADER.unpack(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the server is gone
        if b == 0:
            return
        try:
            probs, states = model.run_batch(areas.windows(b), areas.states(b))
            areas.probs(b)[:] = probs
            areas.out_states(b)[:] = states
        except Exception as exc:  # noqa: BLE001 - a failed round is reported; the parent scores it itself
            conn.send_bytes(f"{type(exc).__name__}: {exc}".encode()[:2000])
            continue
        conn.send_bytes(_OK)
