"""Issue 11, the service side: connection hygiene (idle, slow and oversized requests are closed), errors that
say whose fault they are (a prompt longer than the context; a request lost with its engine), degraded service
while one engine restarts, slots freed when a session ends, and who may read /metrics and /docs.

One server process runs every test here that needs engines (short connection timeouts, two sessions, a
1024-token context); the engine-kill test is last, as it leaves the server restarting an engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import websockets
from pydantic import SecretStr

from tests.conftest import ServerProcess
from tests.test_faults import _engine_core_pids, _flood, _open_non_reading_client

vllm = pytest.mark.vllm

HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 1
CONTEXT = 1024


@pytest.fixture(scope="module")
def service(served_model: Path, tmp_path_factory: pytest.TempPathFactory):
    proc = ServerProcess(served_model, tmp_path_factory.mktemp("hardening-service-log"), "--tts", "none",
                         "--max-sessions", "2", env={
                             "VITA_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S), "VITA_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
                             "VITA_KEEP_ALIVE_TIMEOUT_S": str(KEEP_ALIVE_S), "VITA_MAX_MODEL_LEN": str(CONTEXT),
                             "VITA_MAX_SEND_BUFFER_BYTES": str(64 << 10)})
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


# --- helpers -----------------------------------------------------------------------------------------------


def _addr(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[float | None, bytes]:
    """Read until the server closes the connection: (seconds it took or None, what it sent)."""
    sock.settimeout(0.2)
    t0, got = time.monotonic(), b""
    while time.monotonic() - t0 < seconds:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0, got
        if not data:
            return time.monotonic() - t0, got
        got += data
    return None, got


def _http(url: str, path: str, body: dict | None = None, headers: dict | None = None,
          timeout: float = 120) -> tuple[int, dict[str, str], dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json",
                                                                      **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, json.loads(exc.read() or b"{}")


def _chat(text: str) -> dict:
    return {"model": "vita", "messages": [{"role": "user", "content": text}], "max_tokens": 8}


def _metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


async def _connect(url: str):
    ws = await websockets.connect(url.replace("http://", "ws://") + "/v1/realtime", max_size=None)
    assert json.loads(await ws.recv())["type"] == "session.created"
    return ws


async def _until(ws, kind: str, timeout: float = 60.0) -> list[dict]:
    seen = []
    async with asyncio.timeout(timeout):
        while True:
            seen.append(json.loads(await ws.recv()))
            if seen[-1]["type"] == kind:
                return seen


async def _ask(ws, text: str) -> None:
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}}))
    await ws.send(json.dumps({"type": "response.create"}))


def _types(events: list[dict]) -> list[str]:
    return [e["type"] for e in events]


# --- connection hygiene ---------------------------------------------------------------------------------


@vllm
def test_a_connection_that_sends_nothing_is_closed(service: ServerProcess) -> None:
    with socket.create_connection(_addr(service.url)) as sock:
        took, _ = _closed_within(sock, HEADER_TIMEOUT_S + 5)
    assert took is not None, "an idle TCP connection that never sent a request is still open"
    assert took < HEADER_TIMEOUT_S + 2
    # And after a response, an idle kept-alive connection goes after keep_alive_timeout_s (uvicorn's).
    with socket.create_connection(_addr(service.url)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        took, got = _closed_within(sock, KEEP_ALIVE_S + 5)
    assert got.startswith(b"HTTP/1.1 200") and took is not None and took < KEEP_ALIVE_S + 2


@vllm
def test_slowloris_headers_are_cut_off_at_the_header_timeout(service: ServerProcess) -> None:
    with socket.create_connection(_addr(service.url)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        with contextlib.suppress(OSError):
            while time.monotonic() - t0 < HEADER_TIMEOUT_S + 5:  # one header line every 0.3 s, never the end
                sock.sendall(b"X-Slow: %d\r\n" % int(time.monotonic() * 1000))
                time.sleep(0.3)
        _, got = _closed_within(sock, 1)
    assert time.monotonic() - t0 < HEADER_TIMEOUT_S + 3, "a head sent one line at a time was never cut off"
    assert got.startswith(b"HTTP/1.1 408") or got == b"", got[:100]


@vllm
def test_an_oversized_request_head_is_refused(service: ServerProcess) -> None:
    with socket.create_connection(_addr(service.url)) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * (256 << 10) + b"\r\n")
        took, got = _closed_within(sock, 5)
    assert took is not None
    assert got.startswith(b"HTTP/1.1 431") or got == b"", got[:100]


@vllm
def test_a_slow_body_gets_408_and_the_connection_is_closed(service: ServerProcess) -> None:
    with socket.create_connection(_addr(service.url)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\":")
        took, got = _closed_within(sock, BODY_TIMEOUT_S + 5)
    assert took is not None and took < BODY_TIMEOUT_S + 2, "a body that never completes kept its connection"
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b'"request_timeout"' in got


@vllm
def test_a_client_gone_mid_body_leaves_no_traceback(service: ServerProcess) -> None:
    start = len(service.log())
    for _ in range(3):
        with socket.create_connection(_addr(service.url)) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000\r\n\r\n{\"model\": \"vita\"")
            time.sleep(0.1)
    time.sleep(1.0)
    assert _http(service.url, "/health")[0] == 200
    tail = service.log()[start:]
    assert "Traceback" not in tail and "ClientDisconnect" not in tail, tail[-3000:]


@vllm
async def test_a_slot_is_free_as_soon_as_the_server_ends_a_session(service: ServerProcess) -> None:
    """max_sessions 2: one session stays; the server ends the other (it never reads); a new client gets in
    at once, not only after the close handshake that the non-reading client never completes."""
    keep = await _connect(service.url)
    start = len(service.log())
    sock, proto = _open_non_reading_client(service.url)
    # ~20 MB of replies it never reads: past the socket buffers and the 64 KiB send buffer.
    flood = threading.Thread(target=_flood, args=(sock, proto, 20000), daemon=True)
    flood.start()
    try:
        deadline = time.monotonic() + 60
        while "closing session: client is not reading events" not in service.log()[start:]:
            assert time.monotonic() < deadline, "the server never closed the client that does not read"
            await asyncio.sleep(0.02)
        fresh = await websockets.connect(service.url.replace("http://", "ws://") + "/v1/realtime", max_size=None)
        try:
            first = json.loads(await asyncio.wait_for(fresh.recv(), 10))
        except websockets.ConnectionClosed as closed:
            raise AssertionError(f"refused below capacity: {closed.rcvd}") from None
        assert first["type"] == "session.created", first
        await fresh.close()
        # The session the server ended is freed with it, not kept for the interpreter's next full collection
        # (tests/test_hardening.py has the session a client ends).
        for _ in range(100):
            ended = await asyncio.to_thread(_metric, service.url, "vita_sessions_ended_in_memory")
            if ended == 0:
                break
            await asyncio.sleep(0.1)
        assert ended == 0, f"{ended:.0f} ended sessions are still in memory"
    finally:
        await keep.close()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # the flooding thread's next send fails: it stops
        flood.join(30)
        sock.close()


# --- whose fault ----------------------------------------------------------------------------------------


@vllm
async def test_a_prompt_longer_than_the_context_is_the_clients_error(service: ServerProcess) -> None:
    long_text = "hello there " * 600  # far over 1024 tokens with the tiny model's 512-token vocabulary
    ws = await _connect(service.url)
    try:
        await _ask(ws, long_text)
        events = await _until(ws, "error", timeout=60)
        error = events[-1]["error"]
        assert error["code"] == "context_length_exceeded" and error["type"] == "invalid_request_error", error
        assert str(CONTEXT) in error["message"], error["message"]
        failed = [e for e in events if e["type"] == "response.done"]
        assert not failed or failed[-1]["response"]["status_details"]["error"]["type"] == "invalid_request_error"
        await _ask(ws, "Short one?")  # the session goes on, without the turn that did not fit in its history
        assert (await _until(ws, "response.done"))[-1]["response"]["status"] in ("completed", "incomplete")
    finally:
        await ws.close()

    status, _, body = await asyncio.to_thread(_http, service.url, "/v1/chat/completions", _chat(long_text))
    assert status == 400, body
    assert body["error"]["code"] == "context_length_exceeded" and str(CONTEXT) in body["error"]["message"]


def test_every_engine_failure_code_is_a_wire_error_code() -> None:
    from models.errors import EngineRequestError, EngineUnavailableError, PromptTooLongError
    from server.wire.errors import ErrorCode

    for cls in (EngineRequestError, EngineUnavailableError, PromptTooLongError):
        assert cls.code in {c.value for c in ErrorCode}, cls
    assert ErrorCode(PromptTooLongError.code).error_type == "invalid_request_error"
    assert ErrorCode(EngineUnavailableError.code).error_type == "server_error"


async def test_engine_failures_are_translated_to_their_causes() -> None:
    """vLLM's ways of refusing a long prompt (text alone is checked before vLLM sees it) and of losing its
    engine core become PromptTooLongError (the client's fault, naming the limit) and EngineUnavailableError."""
    from types import SimpleNamespace

    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    from models.engine import EngineInput, VitaEngine
    from models.errors import EngineUnavailableError, PromptTooLongError

    class FakeLLM:
        errored = False
        model_config = SimpleNamespace(max_model_len=1024)

        def __init__(self, exc: Exception) -> None:
            self.exc, self.calls = exc, 0

        async def generate(self, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
            self.calls += 1
            raise self.exc
            yield

    async def run(exc: Exception, ids: int = 10) -> tuple[BaseException, FakeLLM]:
        engine = VitaEngine.__new__(VitaEngine)
        engine._llm = llm = FakeLLM(exc)
        try:
            async for _ in engine.generate(EngineInput(list(range(ids)))):
                pass
        except Exception as raised:  # noqa: BLE001 - what was raised is the result
            return raised, llm
        raise AssertionError("no error")

    renderer = VLLMValidationError("This model's maximum context length is 1024 tokens. However, your prompt "
                                   "contains 3180 input tokens", parameter="input_tokens", value=3180)
    processor = VLLMValidationError("The decoder prompt (length 5000) is longer than the maximum model length "
                                    "of 1024. Make sure that `max_model_len` is no smaller than ...")
    for exc, tokens in ((renderer, 3180), (processor, 5000)):
        raised, _ = await run(exc)
        assert isinstance(raised, PromptTooLongError) and (raised.tokens, raised.limit) == (tokens, 1024)
        assert "1024" in str(raised) and raised.code == "context_length_exceeded"
    raised, llm = await run(EngineDeadError(), ids=1024)  # text alone over the context: vLLM is not asked
    assert isinstance(raised, PromptTooLongError) and llm.calls == 0
    raised, _ = await run(EngineDeadError())
    assert isinstance(raised, EngineUnavailableError) and raised.code == "engine_unavailable"
    other = VLLMValidationError("temperature must be >= 0")
    assert (await run(other))[0] is other


# --- who may read /metrics and /docs (in process: no engines needed) ---------------------------------------


KEY = "hardening-key-7"


@pytest.mark.parametrize("metrics_auth", [False, True])
def test_docs_need_the_key_and_metrics_follow_metrics_auth(metrics_auth: bool) -> None:
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import ServerSettings

    settings = ServerSettings(models=["/nonexistent/vita-model"], device="cpu", tts="none",
                              api_keys=[SecretStr(KEY)], metrics_auth=metrics_auth)
    with TestClient(create_app(settings)) as client:
        auth = {"Authorization": f"Bearer {KEY}"}
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers=auth).status_code == 200, path
        assert client.get("/metrics").status_code == (401 if metrics_auth else 200)
        assert client.get("/metrics", headers=auth).status_code == 200
        assert client.get("/health").status_code == 200  # probes stay open
        assert client.get("/ready").status_code in (200, 503)


# --- an engine dies: 503 / error event for what it held, the other engine serves both roles -----------------


def _engine_pid(server: ServerProcess, cores: str) -> int:
    """The EngineCore process pinned to `cores` (engine 0 gets core "0", engine 1 core "1")."""
    for pid in _engine_core_pids(server.proc.pid):
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"VLLM_CPU_OMP_THREADS_BIND={cores}".encode() in env:
            return pid
    raise AssertionError(f"no EngineCore on cores {cores}")


async def _in_flight_at_least(url: str, n: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while _metric(url, "vita_engine_requests_in_flight") < n:
        assert time.monotonic() < deadline, f"fewer than {n} requests reached the engines"
        await asyncio.sleep(0.05)


@vllm
async def test_engine_loss_is_503_or_an_error_event_and_the_other_engine_serves_meanwhile(
    service: ServerProcess,
) -> None:
    url = service.url
    # Warm engine 0 up: its first request also asks the engine core what it supports, which a stopped
    # engine would never answer, and the request would not count as in flight.
    assert (await asyncio.to_thread(_http, url, "/v1/chat/completions", _chat("Warm up.")))[0] == 200
    ws = await _connect(url)
    engine0 = _engine_pid(service, "0")
    os.kill(engine0, signal.SIGSTOP)  # engine 0 takes requests and answers none: both wait for a first token
    try:
        # Chat goes to the least busy serving engine, ties to engine 0; response.create answers on the
        # session's generator, engine 0 until a spoken or vita.text.append turn swaps the roles.
        chat = asyncio.ensure_future(asyncio.to_thread(_http, url, "/v1/chat/completions", _chat("Hi?")))
        await _in_flight_at_least(url, 1)
        await _ask(ws, "Still there?")
        await _in_flight_at_least(url, 2)
    finally:
        os.kill(engine0, signal.SIGKILL)

    status, headers, body = await asyncio.wait_for(chat, 60)
    assert status == 503, body
    assert body["error"]["code"] == "engine_unavailable" and int(headers["retry-after"]) >= 1, (headers, body)
    events = await _until(ws, "error", timeout=60)
    assert events[-1]["error"]["code"] == "engine_unavailable", events[-1]
    assert events[-1]["error"]["type"] == "server_error"
    done = [e for e in events if e["type"] == "response.done"]
    assert done and done[-1]["response"]["status_details"]["error"]["code"] == "engine_unavailable", _types(events)

    # Degraded: /ready stays 200 and says so, /metrics too, and engine 1 serves both roles.
    async def ready() -> dict:
        code, _, answer = await asyncio.to_thread(_http, url, "/ready")
        assert code == 200, answer
        return answer

    state = await ready()
    assert state["status"] == "degraded" and state["serving"] == 1 and state["engines"] == 2, state
    assert _metric(url, "vita_engines_degraded") == 1 and _metric(url, "vita_engines_serving") == 1
    status, _, body = await asyncio.to_thread(_http, url, "/v1/chat/completions", _chat("Are you there?"))
    assert status == 200, body
    await _ask(ws, "And now?")  # the probe for slot 0 runs on engine 1
    assert (await _until(ws, "response.done"))[-1]["response"]["status"] in ("completed", "incomplete")
    await ws.close()
    assert (await ready())["status"] == "degraded", "engine 0 came back too fast to see the degraded state"

    deadline = time.monotonic() + 240
    while (await ready())["status"] != "ready":
        assert time.monotonic() < deadline, "engine 0 was not restarted"
        await asyncio.sleep(0.5)
    assert _metric(url, "vita_engines_degraded") == 0 and _metric(url, "vita_engine_restarts_total") == 1
    fresh = await _connect(url)
    await _ask(fresh, "Back to two?")
    assert (await _until(fresh, "response.done"))[-1]["response"]["status"] in ("completed", "incomplete")
    await fresh.close()
