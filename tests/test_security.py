"""Security: API keys (HTTP and WebSocket), constant-time key compare, the Origin allow-list, size limits,
no server-side request forgery, no local files, no secrets in logs, no decompression bombs.

Tests marked `vllm` use the shared real server (`server` fixture: API key `API_KEY`, default limits, no media
URL allow-list). The origin allow-list and a failed engine start are tested in-process on an app whose
model does not exist (its engines fail to start at once, so no engines are needed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import http.server
import io
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import websockets
from pydantic import SecretStr

from server.auth import KEY_SUBPROTOCOL_PREFIX, bearer_token, key_matches, subprotocol_key
from tests.conftest import API_KEY

vllm = pytest.mark.vllm
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WRONG_KEY = "sk-wrong-SECRET-0123456789"
MAX_EVENT_BYTES = 15 << 20  # the served test server's (default) limit
CHAT_BODY_LIMIT = 64 << 20  # server/chat.py MAX_BODY_BYTES


def _chat(content: object) -> dict:
    return {"model": "vita", "max_tokens": 4, "messages": [{"role": "user", "content": content}]}


# --- a local listener that records who connects (SSRF canary) ----------------------------------------------


class Canary:
    """A TCP listener on 127.0.0.1 that records every connection (and answers a minimal HTTP 200)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    self.connections.append(conn.recv(4096))
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nContent-Type: image/png\r\n\r\nsecret")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def canary() -> Iterator[Canary]:
    c = Canary()
    yield c
    c.close()


# --- API keys on the real server ---------------------------------------------------------------------------

BAD_AUTH = [
    {},
    {"Authorization": f"Bearer {WRONG_KEY}"},
    {"Authorization": f"Bearer {API_KEY}x"},
    {"Authorization": f"Bearer {API_KEY[:-1]}"},
    {"Authorization": "Bearer"},
    {"Authorization": API_KEY},
    {"Authorization": f"Basic {base64.b64encode(f'user:{API_KEY}'.encode()).decode()}"},
    {"Authorization": f"Token {API_KEY}"},
    {"X-API-Key": API_KEY},
]


@vllm
@pytest.mark.parametrize("headers", BAD_AUTH, ids=lambda h: repr(h)[:40])
def test_http_api_refuses_missing_or_wrong_keys(server_url: str, headers: dict) -> None:
    with httpx.Client(base_url=server_url, timeout=30) as client:
        for response in (
            client.get("/v1/models", headers=headers),
            client.post("/v1/chat/completions", headers=headers, json=_chat("hi")),
        ):
            assert response.status_code == 401, response.text
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert API_KEY not in response.text


@vllm
def test_http_api_accepts_the_key(server_url: str) -> None:
    for scheme in ("Bearer", "bearer"):
        response = httpx.get(server_url + "/v1/models", headers={"Authorization": f"{scheme} {API_KEY}"}, timeout=10)
        assert response.status_code == 200, response.text


@vllm
def test_probes_stay_open_without_a_key(server_url: str) -> None:
    assert httpx.get(server_url + "/health", timeout=10).status_code == 200
    ready = httpx.get(server_url + "/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


async def _ws(url: str, **kw):
    return await websockets.connect(url.replace("http://", "ws://") + "/v1/realtime?model=vita", **kw)


async def _first(ws, timeout: float = 20.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


@vllm
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"additional_headers": {"Authorization": f"Bearer {WRONG_KEY}"}},
        {"additional_headers": {"Authorization": API_KEY}},
        {"subprotocols": ["realtime", f"{KEY_SUBPROTOCOL_PREFIX}{WRONG_KEY}"]},
        {"subprotocols": ["realtime", KEY_SUBPROTOCOL_PREFIX]},
        {"subprotocols": ["realtime", f"{KEY_SUBPROTOCOL_PREFIX}{API_KEY}x"]},
        {"subprotocols": ["realtime", f"openai-insecure-api-key{API_KEY}"]},
    ],
    ids=["none", "wrong-bearer", "no-scheme", "wrong-subprotocol", "empty-subprotocol", "longer-subprotocol",
         "no-dot-subprotocol"],
)
async def test_realtime_refuses_missing_or_wrong_keys_with_1008(server_url: str, kw: dict) -> None:
    ws = await _ws(server_url, **kw)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        event = await _first(ws)
        pytest.fail(f"an unauthenticated socket got an event: {event}")
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
    assert API_KEY not in closed.value.rcvd.reason


@vllm
@pytest.mark.parametrize(
    "kw",
    [
        {"additional_headers": AUTH},
        {"subprotocols": ["realtime", f"{KEY_SUBPROTOCOL_PREFIX}{API_KEY}"]},
        {"subprotocols": [f"{KEY_SUBPROTOCOL_PREFIX}{API_KEY}", "realtime"]},
    ],
    ids=["bearer", "subprotocol", "subprotocol-first"],
)
async def test_realtime_accepts_the_key_as_header_or_subprotocol(server_url: str, kw: dict) -> None:
    ws = await _ws(server_url, **kw)
    try:
        assert (await _first(ws))["type"] == "session.created"
        if "subprotocols" in kw:
            # The server must never echo the key subprotocol back (it would land in logs and proxies).
            assert ws.subprotocol == "realtime"
    finally:
        await ws.close()


# --- key comparison (unit) ---------------------------------------------------------------------------------


def test_key_matches_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a, b):  # type: ignore[no-untyped-def]
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = [SecretStr("first-key"), SecretStr("second-key"), SecretStr("third-key")]
    for candidate, expected in [("first-key", True), ("third-key", True), ("nope", False), ("first-ke", False)]:
        calls.clear()
        assert key_matches(candidate, keys) is expected
        # one constant-time compare per configured key, also when the first one already matched
        assert len(calls) == len(keys), (candidate, calls)
        assert [b for _, b in calls] == [k.get_secret_value().encode() for k in keys]


@pytest.mark.parametrize("keys", [[SecretStr("k")], [SecretStr("k"), SecretStr("")], [SecretStr("")]],
                         ids=["one-key", "with-an-empty-key", "only-an-empty-key"])
@pytest.mark.parametrize("candidate", [None, ""])
def test_key_matches_rejects_none_and_empty(candidate: str | None, keys: list[SecretStr]) -> None:
    """An empty key must never authenticate, not even against an empty configured key (`--api-key "$UNSET"`):
    a browser can send an empty key as the bare `openai-insecure-api-key.` subprotocol."""
    assert key_matches(candidate, keys) is False


def test_key_matches_non_ascii_candidates_do_not_raise() -> None:
    assert key_matches("ключ-🔑", [SecretStr("k")]) is False
    assert key_matches("k\x00", [SecretStr("k")]) is False


def test_bearer_and_subprotocol_parsing() -> None:
    assert bearer_token(f"Bearer {API_KEY}") == API_KEY
    assert bearer_token(f"bearer   {API_KEY}  ") == API_KEY
    for bad in (None, "", "Bearer", "Bearer ", "Basic abc", API_KEY):
        assert bearer_token(bad) is None
    assert subprotocol_key(["realtime", KEY_SUBPROTOCOL_PREFIX + "abc"]) == "abc"
    assert subprotocol_key(["realtime"]) is None


# --- origin allow-list and a failed engine start, in-process ----------------------------------------------

GOOD_ORIGIN = "https://good.example"
INPROC_KEY = "inproc-SECRET-key-42"


@pytest.fixture(scope="module")
def inproc():  # type: ignore[no-untyped-def]
    """create_app with an allow-listed origin, a key and a model that does not exist: engines fail at once."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import ServerSettings

    settings = ServerSettings(
        models=["/nonexistent/vita-model"], device="cpu", tts="none", api_keys=[SecretStr(INPROC_KEY)],
        allowed_origins=[GOOD_ORIGIN],
    )
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/ready").json()["status"] in ("loading", "restarting"):
            assert time.monotonic() < deadline, "engines neither started nor failed in 120 s"
            time.sleep(0.1)
        yield client


def test_failed_engine_start_is_reported_by_ready(inproc) -> None:  # type: ignore[no-untyped-def]
    ready = inproc.get("/ready")
    assert ready.status_code == 503
    assert ready.json()["status"] == "failed" and ready.json()["error"]
    assert "nonexistent" not in ready.text  # no paths to whoever can reach the port
    assert inproc.get("/health").status_code == 200  # the process itself is fine
    chat = inproc.post("/v1/chat/completions", headers={"Authorization": f"Bearer {INPROC_KEY}"}, json=_chat("hi"))
    assert chat.status_code == 503 and chat.json()["error"]["code"] == "engines_not_ready"


@pytest.mark.parametrize(
    "origin", ["https://evil.example", "null", "https://good.example.evil.example", "http://good.example",
               "https://evil.example/https://good.example", "https://good.example:8443"],
)
def test_disallowed_origin_is_403_on_the_api(inproc, origin: str) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {INPROC_KEY}", "Origin": origin}
    for response in (inproc.get("/v1/models", headers=headers),
                     inproc.post("/v1/chat/completions", headers=headers, json=_chat("hi"))):
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "origin_not_allowed"


@pytest.mark.parametrize("origin", [GOOD_ORIGIN, GOOD_ORIGIN + "/", None])
def test_allowed_or_absent_origin_passes_to_the_key_check(inproc, origin: str | None) -> None:  # type: ignore[no-untyped-def]
    origin_header = {"Origin": origin} if origin else {}
    assert inproc.get("/v1/models", headers={**origin_header, "Authorization": f"Bearer {INPROC_KEY}"}).status_code == 200
    assert inproc.get("/v1/models", headers=origin_header).status_code == 401


def _ws_close_code(client, headers: dict, subprotocols: list[str] | None = None) -> tuple[int, list[dict]]:  # type: ignore[no-untyped-def]
    from starlette.websockets import WebSocketDisconnect

    received: list[dict] = []
    with client.websocket_connect("/v1/realtime", headers=headers, subprotocols=subprotocols or []) as ws:
        try:
            while True:
                received.append(ws.receive_json())
        except WebSocketDisconnect as exc:
            return exc.code, received
    raise AssertionError("the socket was not closed")


def test_realtime_origin_allow_list(inproc) -> None:  # type: ignore[no-untyped-def]
    key = {"Authorization": f"Bearer {INPROC_KEY}"}
    code, events = _ws_close_code(inproc, {**key, "Origin": "https://evil.example"})
    assert code == 1008 and events == []
    code, events = _ws_close_code(inproc, {"Origin": GOOD_ORIGIN})
    assert code == 1008 and events == []  # a good origin does not replace the key
    # good origin + key: past both checks, the (failed) engines answer
    code, events = _ws_close_code(inproc, {**key, "Origin": GOOD_ORIGIN})
    assert code == 1013 and events and events[0]["error"]["code"] == "engines_not_ready"


def test_an_empty_configured_key_lets_nobody_in() -> None:
    """`vita-duplex serve --api-key "$UNSET_VAR"` (or VITA_API_KEYS='[""]') configures one empty key: the server
    must then refuse everyone (or refuse to start), never accept an empty key from a client."""
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import load_settings

    try:
        settings = load_settings({"api_keys": [""], "models": ["/nonexistent"], "tts": "none"})
    except ValueError:
        return  # refusing such settings at start-up is fine too
    client = TestClient(create_app(settings))  # no lifespan: engines never start, auth runs first anyway
    assert client.get("/v1/models", headers={"Authorization": "Bearer "}).status_code == 401
    code, events = _ws_close_code(client, {}, ["realtime", KEY_SUBPROTOCOL_PREFIX])
    assert code == 1008 and events == [], f"an empty subprotocol key was accepted: close {code}, {events}"


def test_keys_never_reach_log_records(inproc, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    with caplog.at_level(logging.DEBUG):
        for key in (INPROC_KEY, WRONG_KEY):
            inproc.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            inproc.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=_chat("hi"))
            with contextlib.suppress(Exception):
                _ws_close_code(inproc, {"Origin": GOOD_ORIGIN}, ["realtime", KEY_SUBPROTOCOL_PREFIX + key])
    text = "\n".join(f"{r.getMessage()} {r.args!r} {r.__dict__!r}" for r in caplog.records)
    assert INPROC_KEY not in text and WRONG_KEY not in text


# --- size limits --------------------------------------------------------------------------------------------


def test_chat_body_over_the_limit_is_413(inproc) -> None:  # type: ignore[no-untyped-def]
    headers = {"Authorization": f"Bearer {INPROC_KEY}", "Content-Type": "application/json"}
    # declared too large: refused from the header alone
    declared = inproc.post("/v1/chat/completions", headers={**headers, "Content-Length": str(CHAT_BODY_LIMIT + 1)},
                           content=b"{}")
    assert declared.status_code == 413, declared.text
    # chunked (no Content-Length): refused once the limit is crossed
    chunk = b" " * (1 << 20)

    def body() -> Iterator[bytes]:
        for _ in range((CHAT_BODY_LIMIT >> 20) + 2):
            yield chunk

    chunked = inproc.post("/v1/chat/completions", headers=headers, content=body())
    assert chunked.status_code == 413, chunked.text
    assert chunked.json()["error"]["code"] == "request_too_large"


@vllm
def test_chat_body_declared_over_the_limit_is_413_on_the_wire(server_url: str) -> None:
    host, port = server_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {CHAT_BODY_LIMIT + 1}\r\n\r\n{{".encode()
        )
        head = s.recv(4096).decode(errors="replace")
    assert head.startswith("HTTP/1.1 413"), head


@vllm
async def test_realtime_event_over_max_event_bytes_gets_event_too_large(server_url: str) -> None:
    ws = await _ws(server_url, additional_headers=AUTH, max_size=None)
    try:
        assert (await _first(ws))["type"] == "session.created"
        head = '{"type": "input_audio_buffer.clear", "pad": "'
        exact = head + "A" * (MAX_EVENT_BYTES - len(head) - 2) + '"}'
        assert len(exact.encode()) == MAX_EVENT_BYTES
        await ws.send(exact)  # at the limit: accepted
        assert (await _first(ws, 60))["type"] == "input_audio_buffer.cleared"
        await ws.send(exact[:-2] + 'A"}')  # one byte over
        error = await _first(ws, 60)
        assert error["type"] == "error" and error["error"]["code"] == "event_too_large"
        await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        assert (await _first(ws))["type"] == "input_audio_buffer.cleared"  # the session goes on
    finally:
        await ws.close()


@vllm
async def test_realtime_limit_counts_bytes_not_characters(server_url: str) -> None:
    """max_event_bytes is a byte limit: 6 M three-byte characters (18 MiB of UTF-8) are over 15 MiB."""
    ws = await _ws(server_url, additional_headers=AUTH, max_size=None)
    try:
        assert (await _first(ws))["type"] == "session.created"
        text = json.dumps({"type": "input_audio_buffer.clear", "pad": "€" * (6 << 20)}, ensure_ascii=False)
        assert len(text) < MAX_EVENT_BYTES < len(text.encode())
        await ws.send(text)
        event = await _first(ws, 60)
        assert event["type"] == "error" and event["error"]["code"] == "event_too_large", event
    finally:
        await ws.close()


# --- no server-side request forgery, no local files ----------------------------------------------------------

def _ssrf_urls(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/cat.png", f"http://localhost:{port}/cat.png", f"https://127.0.0.1:{port}/cat.png",
        f"http://127.1:{port}/cat.png", f"http://2130706433:{port}/cat.png", f"http://0x7f000001:{port}/cat.png",
        f"http://[::ffff:127.0.0.1]:{port}/cat.png", f"http://user:pw@127.0.0.1:{port}/cat.png",
        f"http://good.example@127.0.0.1:{port}/cat.png", f"HTTP://127.0.0.1:{port}/cat.png",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/", "http://[fd00:ec2::254]/latest/",
        "http://metadata.google.internal/computeMetadata/v1/", "http://0.0.0.0:22/",
    ]


@vllm
def test_chat_media_urls_to_private_addresses_are_refused_without_a_request(server_url: str, canary: Canary) -> None:
    refused = []
    with httpx.Client(base_url=server_url, headers=AUTH, timeout=30) as client:
        for url in _ssrf_urls(canary.port):
            for part in ({"type": "image_url", "image_url": {"url": url}},
                         {"type": "video_url", "video_url": {"url": url}}):
                response = client.post("/v1/chat/completions", json=_chat([{"type": "text", "text": "hi"}, part]))
                assert response.status_code == 400, (url, response.status_code, response.text)
                assert response.json()["error"]["code"] in ("media_url_refused", "invalid_media"), response.text
                assert "secret" not in response.text
                refused.append(url)
    time.sleep(0.5)
    assert canary.connections == [], f"the server connected to a local listener: {canary.connections}"
    assert len(refused) == 2 * len(_ssrf_urls(canary.port))


LOCAL_PATHS = ["/etc/passwd", "file:///etc/passwd", "file://localhost/etc/passwd", "FILE:///etc/passwd",
               "../../../../etc/passwd", "C:\\Windows\\win.ini", "/proc/self/environ", "~/.ssh/id_rsa"]


@vllm
@pytest.mark.parametrize("path", LOCAL_PATHS)
def test_chat_never_reads_local_files(server_url: str, path: str) -> None:
    parts = [
        {"type": "image_url", "image_url": {"url": path}},
        {"type": "video_url", "video_url": {"url": path}},
        {"type": "input_audio", "input_audio": {"data": path, "format": "wav"}},
    ]
    with httpx.Client(base_url=server_url, headers=AUTH, timeout=30) as client:
        for part in parts:
            response = client.post("/v1/chat/completions", json=_chat([{"type": "text", "text": "hi"}, part]))
            assert response.status_code == 400, (part, response.status_code, response.text)
            assert "root:" not in response.text and "PATH=" not in response.text


@vllm
@pytest.mark.parametrize("path", ["/etc/passwd", "file:///etc/passwd", "../../etc/passwd"])
async def test_realtime_never_reads_local_files(server_url: str, path: str) -> None:
    ws = await _ws(server_url, additional_headers=AUTH)
    try:
        assert (await _first(ws))["type"] == "session.created"
        for event in (
            {"type": "vita.frame.append", "image": path, "event_id": "frame"},
            {"type": "conversation.item.create", "event_id": "item", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_image", "image_url": path}]}},
        ):
            await ws.send(json.dumps(event))
            error = await _first(ws)
            assert error["type"] == "error" and error["error"]["code"] == "invalid_image", error
            assert error["error"]["event_id"] == event["event_id"]
    finally:
        await ws.close()


# --- server/media.py with an allow-list, in-process ------------------------------------------------------------


class _Redirector(http.server.BaseHTTPRequestHandler):
    target = ""

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _http_server(handler: type) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


async def test_allow_listed_host_redirecting_to_a_private_address_is_not_followed(canary: Canary) -> None:
    from server.media import FetchPolicy, MediaURLRefusedError, load_image

    _Redirector.target = f"http://127.0.0.1:{canary.port}/secret"
    with _http_server(_Redirector) as port:
        # The operator allow-listed this exact (internal) host; its redirect still must not be followed.
        policy = FetchPolicy.of(["127.0.0.1"])
        with pytest.raises(MediaURLRefusedError, match="redirect"):
            await load_image(f"http://127.0.0.1:{port}/cat.png", policy)
    await asyncio.sleep(0.3)
    assert canary.connections == []


def _fake_dns(answers: list[str]):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        return answers

    return resolve


@pytest.mark.parametrize(
    "answers",
    [["127.0.0.1"], ["93.184.215.14", "127.0.0.1"], ["::ffff:127.0.0.1"], ["169.254.169.254"], ["10.0.0.1"],
     ["0.0.0.0"], ["::1"], ["fe80::1"], ["100.64.0.1"]],
)
async def test_wildcard_allow_listed_host_resolving_to_a_private_address_is_refused(
    canary: Canary, answers: list[str]
) -> None:
    from server.media import FetchPolicy, MediaURLRefusedError, fetch_remote

    policy = FetchPolicy(("*.example.com",), resolve=_fake_dns(answers))
    with pytest.raises(MediaURLRefusedError):
        await fetch_remote(f"http://cdn.example.com:{canary.port}/cat.png", policy, max_bytes=1 << 20, timeout_s=5)
    assert canary.connections == []


async def test_allow_list_cannot_be_fooled_by_userinfo_or_fragments(canary: Canary) -> None:
    from server.media import FetchPolicy, MediaURLRefusedError, fetch_remote

    policy = FetchPolicy(("good.example",), resolve=_fake_dns(["93.184.215.14"]))
    for url in (f"http://good.example@127.0.0.1:{canary.port}/", f"http://127.0.0.1:{canary.port}#@good.example/",
                f"http://127.0.0.1:{canary.port}?@good.example/", f"http://good.example.127.0.0.1.nip.io:{canary.port}/",
                f"http://127.0.0.1:{canary.port}/good.example"):
        with pytest.raises(MediaURLRefusedError):
            await fetch_remote(url, policy, max_bytes=1 << 20, timeout_s=5)
    assert canary.connections == []


async def test_remote_fetch_is_bounded_in_time() -> None:
    """A host that accepts and never answers costs at most timeout_s (no slow-loris hold on the server)."""
    from server.media import FetchPolicy, InvalidMediaError, fetch_remote

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        policy = FetchPolicy.of(["127.0.0.1"])
        started = time.monotonic()
        with pytest.raises(InvalidMediaError, match="longer than"):
            await fetch_remote(f"http://127.0.0.1:{silent.getsockname()[1]}/x", policy, max_bytes=1024, timeout_s=0.5)
        assert time.monotonic() - started < 3
    finally:
        silent.close()


# --- secrets never logged ------------------------------------------------------------------------------------


@vllm
async def test_keys_never_appear_in_the_server_log(server, server_url: str) -> None:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=server_url, timeout=30) as client:
        for key in (API_KEY, WRONG_KEY):
            client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=_chat("hi"))
    for kw in ({"subprotocols": ["realtime", KEY_SUBPROTOCOL_PREFIX + API_KEY]},
               {"subprotocols": ["realtime", KEY_SUBPROTOCOL_PREFIX + WRONG_KEY]},
               {"additional_headers": {"Authorization": f"Bearer {WRONG_KEY}"}}):
        ws = await _ws(server_url, **kw)
        with contextlib.suppress(Exception):
            await _first(ws, 5)
        await ws.close()
    await asyncio.sleep(0.5)
    log = server.log()
    assert "GET /v1/models" in log  # the log does record these requests
    assert API_KEY not in log and WRONG_KEY not in log


# --- decompression bombs -------------------------------------------------------------------------------------


def _png_bomb(side: int = 9400) -> str:
    """A ~11 kB PNG that decodes to side x side pixels (just under PIL's own 89 M pixel warning)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@vllm
async def test_realtime_refuses_decompression_bombs_without_stalling(server_url: str) -> None:
    """A tiny frame that decodes to 88 M pixels (265 MB as RGB) must be refused before it is decoded: decoded
    on the event loop it stalls every session for seconds, and kept in the frame window (32 frames a session)
    it exhausts memory."""
    bomb = _png_bomb()
    ws = await _ws(server_url, additional_headers=AUTH)
    try:
        assert (await _first(ws))["type"] == "session.created"
        started = time.monotonic()
        await ws.send(json.dumps({"type": "vita.frame.append", "image": bomb, "event_id": "bomb"}))
        await ws.send(json.dumps({"type": "conversation.item.delete", "item_id": "x", "event_id": "after"}))
        async with httpx.AsyncClient(base_url=server_url, timeout=60) as client:
            health = await client.get("/health")  # answered while the frame is handled
        stalled = time.monotonic() - started
        event = await _first(ws, 60)
        assert health.status_code == 200
        assert event["type"] == "error" and event["error"]["event_id"] == "bomb", f"the bomb was accepted: {event}"
        assert event["error"]["code"] == "invalid_image", event
        assert stalled < 3.0, f"/health took {stalled:.1f} s while one frame was handled"
    finally:
        await ws.close()


@vllm
def test_chat_refuses_decompression_bombs(server_url: str) -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _png_bomb()}}
    response = httpx.post(server_url + "/v1/chat/completions", headers=AUTH, timeout=120,
                          json=_chat([{"type": "text", "text": "hi"}, part]))
    assert response.status_code == 400, response.text
