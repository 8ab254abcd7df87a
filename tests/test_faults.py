"""Faults against a real server process: client gone mid-answer, an engine process killed, a client
that never reads, and SIGTERM. This module runs its own server (small send buffer, no API key)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websockets
from websockets.client import ClientProtocol
from websockets.uri import parse_uri

from tests.conftest import ServerProcess
from tests.test_server_realtime import _question

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def fault_server(served_model: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(served_model, tmp_path_factory.mktemp("fault-log"), "--max-sessions", "8",
                         env={"VITA_MAX_SEND_BUFFER_BYTES": str(1 << 20), "VITA_MAX_TOKENS": "200"})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _ready_status(url: str) -> str | None:
    """/ready's status while it answers 200 ("ready" or "degraded"), else None."""
    try:
        with urllib.request.urlopen(url + "/ready", timeout=2) as r:
            return str(json.loads(r.read())["status"])
    except (urllib.error.HTTPError, OSError):
        return None


async def _connect(url: str, text_only: bool = True):
    ws = await websockets.connect(url.replace("http://", "ws://") + "/v1/realtime", max_size=None)
    assert json.loads(await ws.recv())["type"] == "session.created"
    if text_only:
        await ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"]}}))
        assert json.loads(await ws.recv())["type"] == "session.updated"
    return ws


async def _until(ws, kind: str, timeout: float = 30.0) -> list[dict]:
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            event = json.loads(await ws.recv())
            seen.append(event)
            if event["type"] == kind:
                return seen


async def _ask_text(ws, text: str = "Hello?") -> None:
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    await ws.send(json.dumps({"type": "response.create"}))


async def _wait_in_flight(url: str, value: float, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while True:
        current = _metric(url, "vita_engine_requests_in_flight")
        if current == value or time.monotonic() > deadline:
            return current
        await asyncio.sleep(0.05)


async def test_client_disconnect_mid_answer_aborts_the_engine_request(fault_server: ServerProcess) -> None:
    ws = await _connect(fault_server.url)
    await _ask_text(ws, "Tell me a long story.")
    await _until(ws, "response.output_text.delta")
    assert _metric(fault_server.url, "vita_engine_requests_in_flight") >= 1
    await ws.close()
    t0 = time.monotonic()
    assert await _wait_in_flight(fault_server.url, 0, timeout=1.0) == 0
    assert time.monotonic() - t0 <= 1.0


def _open_non_reading_client(url: str) -> tuple[socket.socket, ClientProtocol]:
    """A WebSocket client that, after the handshake, never reads: a tiny receive buffer and no reads."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.connect((host, int(port)))
    proto = ClientProtocol(parse_uri(f"ws://{host}:{port}/v1/realtime"))
    proto.send_request(proto.connect())
    for data in proto.data_to_send():
        sock.sendall(data)
    while proto.state.name == "CONNECTING":
        proto.receive_data(sock.recv(4096))
    return sock, proto


def _flood(sock: socket.socket, proto: ClientProtocol, n: int) -> int:
    """Send up to n session.update events; returns how many went out before the server cut the socket."""
    update = json.dumps({"type": "session.update", "session": {"instructions": "x" * 400}}).encode()
    for i in range(n):  # each is answered by a ~1 KB session.updated that this client never reads
        proto.send_text(update)
        try:
            for data in proto.data_to_send():
                sock.sendall(data)
        except (ConnectionResetError, BrokenPipeError):  # the server gave up on this client: expected
            return i
    return n


async def test_a_client_that_never_reads_is_closed_and_others_are_unaffected(fault_server: ServerProcess) -> None:
    sock, proto = _open_non_reading_client(fault_server.url)
    await asyncio.to_thread(_flood, sock, proto, 20000)  # ~20 MB of replies: far past socket buffers + 1 MiB
    healthy = await _connect(fault_server.url)
    await _ask_text(healthy, "Are you there?")
    events = await _until(healthy, "response.done", timeout=60)
    assert events[-1]["response"]["status"] in ("completed", "incomplete")
    deadline = time.monotonic() + 60
    while "closing session: client is not reading events (send buffer full)" not in fault_server.log():
        assert time.monotonic() < deadline, "the server never closed the client that does not read"
        await asyncio.sleep(0.2)
    # The server gave up on the session; once the client reads again, the connection ends: with the
    # 1008 close frame when it fits in what the client still has to read, else with a reset.
    sock.settimeout(60)
    ended = False
    while not ended:
        try:
            data = await asyncio.to_thread(sock.recv, 1 << 16)
        except ConnectionResetError:
            break
        proto.receive_data(data)
        ended = not data or proto.close_rcvd is not None
    if proto.close_rcvd is not None:
        assert proto.close_rcvd.code == 1008, proto.close_rcvd
    sock.close()
    await healthy.close()
    assert await _wait_in_flight(fault_server.url, 0, timeout=2.0) == 0


def _engine_core_pids(server_pid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == server_pid and ("EngineCore" in cmd or "EngineCore" in status.splitlines()[0]):
            pids.append(int(entry.name))
    return pids


async def test_killed_engine_is_reported_and_restarted(fault_server: ServerProcess) -> None:
    ws = await _connect(fault_server.url)
    await _ask_text(ws, "Tell me a long story.")
    await _until(ws, "response.output_text.delta")
    pids = _engine_core_pids(fault_server.proc.pid)
    assert pids, "no EngineCore process found under the server"
    os.kill(pids[0], signal.SIGKILL)
    t0 = time.monotonic()
    # Degraded, not down: the other engine serves both roles meanwhile (tests/test_hardening_service.py).
    while _ready_status(fault_server.url) != "degraded":
        assert time.monotonic() - t0 < 5.0, "/ready does not say degraded 5 s after an engine died"
        await asyncio.sleep(0.1)
    events = await _until(ws, "response.done", timeout=30)
    errors = [e for e in events if e["type"] == "error"]
    done = events[-1]["response"]
    assert errors or done["status"] == "failed", [e["type"] for e in events]
    assert fault_server.proc.poll() is None  # the server process stays up
    deadline = time.monotonic() + 150
    while _ready_status(fault_server.url) != "ready":
        assert time.monotonic() < deadline, "engine was not restarted"
        await asyncio.sleep(0.5)
    await _ask_text(ws, "Are you back?")  # the same session keeps working
    assert (await _until(ws, "response.done", timeout=60))[-1]["response"]["status"] in ("completed", "incomplete")
    await ws.close()
    fresh = await _connect(fault_server.url)
    await _ask_text(fresh)
    assert (await _until(fresh, "response.done", timeout=60))[-1]["type"] == "response.done"
    await fresh.close()


async def test_sigusr1_logs_what_every_task_waits_on_and_changes_nothing(fault_server: ServerProcess) -> None:
    ws = await _connect(fault_server.url)
    os.kill(fault_server.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    # The session's reader task, named "read", is parked in its receive: its stack says so.
    while "task read:\nStack for <Task pending name='read'" not in fault_server.log():
        assert time.monotonic() < deadline, "no task stacks logged after SIGUSR1"
        await asyncio.sleep(0.1)
    assert "in _read" in fault_server.log()
    assert fault_server.proc.poll() is None
    await _ask_text(ws, "Still there?")  # the session is untouched
    assert (await _until(ws, "response.done", timeout=60))[-1]["response"]["status"] in ("completed", "incomplete")
    await ws.close()


async def test_sigterm_closes_sessions_with_a_reason_and_stops_cleanly(
    served_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    proc = ServerProcess(served_model, tmp_path_factory.mktemp("sigterm-log"), "--engines", "1")
    try:
        await asyncio.to_thread(proc.wait_ready)
        ws = await _connect(proc.url)
        pcm = _question()
        await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                  "audio": base64.b64encode(pcm[: len(pcm) // 2]).decode()}))
        engine_pids = _engine_core_pids(proc.proc.pid)
        proc.proc.send_signal(signal.SIGTERM)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(15):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
        assert closed.value.rcvd.reason == "server shutting down"
        assert await asyncio.to_thread(proc.proc.wait, 60) == 0
        for pid in engine_pids:  # engines shut down with the server: no orphans
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    finally:
        proc.stop()
