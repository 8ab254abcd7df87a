"""Fuzzing the live server: hypothesis-generated Realtime events over a few long-lived WebSockets, and
schemathesis over the HTTP API's OpenAPI schema; then the fuzzers' findings as plain regression tests.

Realtime: one `@given` run draws batches of frames (valid-looking client events of every type with random
nested fields and wrong field types, mixed with garbage: random JSON, non-objects, unknown types, weird
and lone-surrogate unicode, huge strings, deep nesting, 5000-digit numbers, binary frames) and sends each
batch, split over `LANES` connections that live for `CONNECTION_CASES` cases each. Server events are
drained concurrently. After every batch: the sockets are still open, every invalid frame got an `error`
event naming a documented code (matched by event_id where the frame had one, counted per code where it had
none), the process is alive and /health answers. When a connection retires, its session must still answer
a typed question (`response.done` with text); at the end no session or engine request is left over.

`VITA_FUZZ_CASES` (default 10 000) scales the run for nightly jobs; the measured cases/s is printed (-s).
`VITA_FUZZ_SEED` fixes the draw (default: a fixed seed, so CI is repeatable); `VITA_FUZZ_SEED=random`
explores new cases (nightly, or by hand before a release) and a failure prints a `@reproduce_failure` blob.

HTTP: schemathesis generates schema-valid and schema-invalid requests for every operation of /openapi.json
(the server declares the chat body as `server.chat.ChatRequest`; the test checks it is there), plus
chat bodies repaired so that the engine really runs them; no 5xx is allowed but 503 with an error code.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import io
import json
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
import requests
import websockets
from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
from hypothesis import strategies as st

from server.wire.client_events import ALIASES, EVENT_TYPES, parse_client_event
from server.wire.errors import ErrorCode, ProtocolError
from tests.conftest import API_KEY

pytestmark = [pytest.mark.vllm, pytest.mark.filterwarnings("ignore:Generating overly large repr")]

CASES = int(os.environ.get("VITA_FUZZ_CASES", "10000"))
BATCH = 48  # frames per hypothesis example (split over the lanes)
LANES = 3  # concurrent connections (the served test server admits 4 sessions)
SEED = os.environ.get("VITA_FUZZ_SEED", "20261126")
CONNECTION_CASES = int(os.environ.get("VITA_FUZZ_CONNECTION_CASES", "2500"))  # frames before a lane reconnects
MAX_EVENT_BYTES = 15 << 20  # the served test server's (default) limit
HUGE = 16 << 10  # longest generated string (raw frames: up to GIANT)
GIANT = 256 << 10
AUTH = {"Authorization": f"Bearer {API_KEY}"}  # never hand this dict itself to a library that may add to it

KNOWN_TYPES = EVENT_TYPES
# Codes the realtime endpoint documents: one enum (server/wire/errors.py) for the server and its tests.
KNOWN_CODES = frozenset(ErrorCode)
PARSE_CODES = {ErrorCode.INVALID_JSON, ErrorCode.INVALID_EVENT, ErrorCode.MISSING_TYPE, ErrorCode.UNKNOWN_EVENT_TYPE,
               ErrorCode.INVALID_VALUE}
ANY = frozenset({"*"})  # any code will do (the frame is invalid, the server may name it as it likes)
UNSURE = frozenset({"?"})  # valid or not depends on the server's stack depth: not checked


# --- strategies ------------------------------------------------------------------------------------------

SPECIAL_STRINGS = [
    "", " ", "\x00", "\n\r\t", "null", "true", "[]", "{}", "☞", "☟", "☜", "<|im_end|>", "<|im_start|>system\n",
    "<image>", "<audio>", "<video>", "<1>", "<2>", "<3>", "data:", "data:,", "data:image/png;base64,",
    "file:///etc/passwd", "/etc/passwd", "C:\\Windows\\win.ini", "http://127.0.0.1:1/",
    "http://169.254.169.254/latest/meta-data/", "\u202egnp.exe", "\ufeff", "😀" * 3, "a" * 300, "%s%n%x",
    "${jndi:ldap://x/a}", "'; DROP TABLE t;--", "\r\n\r\nHTTP/1.1 200 OK", "NaN", "-0", "1e400",
    "sess_" + "0" * 20, "item_" + "0" * 20, "resp_x", "inf",
]

weird_text = st.text(st.characters(codec="utf-8"), max_size=12)  # any code point but surrogates
surrogate_text = st.builds(lambda a, s, b: a + s + b, weird_text, st.characters(categories=["Cs"]), weird_text)
huge_text = st.builds(lambda s, n: (s * n)[:HUGE], st.text(st.characters(codec="utf-8"), min_size=1, max_size=4),
                      st.integers(256, HUGE))
strings = st.one_of(*[weird_text] * 12, *[st.sampled_from(SPECIAL_STRINGS)] * 5, huge_text)
ints = st.one_of(st.integers(-10, 30_000), st.integers(), st.sampled_from([0, -1, 2**31, 2**63, -(2**63), 10**30]))
floats = st.floats(allow_nan=True, allow_infinity=True)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, strings)
garbage = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(strings, inner, max_size=3),
    max_leaves=4,
)


def wrong(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly the right type, sometimes any JSON value."""
    return st.one_of(strategy, strategy, strategy, garbage)


def _noise(seed: int, n: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _tone(freq: int, amplitude: float, n: int) -> bytes:
    t = np.arange(n) / 24000
    return (amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2").tobytes()


audio_bytes = st.one_of(
    st.builds(_noise, st.integers(0, 2**32 - 1), st.integers(0, 9600)),
    st.builds(_tone, st.integers(50, 4000), st.floats(0, 1), st.integers(0, 4800)),
    st.integers(0, 4800).map(lambda n: bytes(n)),
    st.binary(max_size=16),
)


def _b64_variants(raw: bytes, how: int) -> str:
    text = base64.b64encode(raw).decode()
    return [
        text, text, text.rstrip("="), base64.urlsafe_b64encode(raw).decode(), "\n".join(text[i : i + 76] for i in
        range(0, len(text), 76)), "data:audio/wav;base64," + text, text + "!", " " + text,
    ][how]


audio_b64 = st.builds(_b64_variants, audio_bytes, st.integers(0, 7))


def _png(size: tuple[int, int], mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, "PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


_PNG = _png((8, 8), "RGB")
_IMAGES = [
    base64.b64encode(_PNG).decode(), "data:image/png;base64," + base64.b64encode(_PNG).decode(),
    "data:image/jpeg;base64," + base64.b64encode(_jpeg()).decode(), base64.b64encode(_png((1, 1), "RGBA")).decode(),
    base64.b64encode(_png((3, 1), "L")).decode(), base64.b64encode(_PNG[: len(_PNG) // 2]).decode(),
    base64.b64encode(b"GIF89a" + bytes(20)).decode(), "data:text/plain,hello", "data:image/png;base64,%%%",
]
images = st.one_of(
    st.sampled_from(_IMAGES), st.sampled_from(_IMAGES),
    st.builds(lambda seed, n: base64.b64encode(_noise(seed, n)).decode(), st.integers(0, 2**32 - 1),
              st.integers(0, 2048)),
    strings,
)

# Placeholders replaced at send time by ids the connection has seen (so truncate/cancel hit real items).
ASSISTANT_ITEM, RESPONSE_ID, USER_ITEM = "$ASSISTANT_ITEM", "$RESPONSE_ID", "$USER_ITEM"
ids = st.one_of(st.sampled_from([ASSISTANT_ITEM, RESPONSE_ID, USER_ITEM]), strings)

modalities = st.lists(st.one_of(st.sampled_from(["text", "audio"]), st.sampled_from(["text", "audio"]), strings),
                      max_size=3)
audio_format = st.one_of(
    st.sampled_from(["pcm16", "g711_ulaw", "g711_alaw", "pcm24", "wav"]),
    st.fixed_dictionaries(
        {"type": wrong(st.sampled_from(["audio/pcm", "audio/pcmu", "audio/pcma", "audio/flac"]))},
        optional={"rate": wrong(st.sampled_from([16000, 24000, 8000, 44100, 16000.0, 0, -24000]) | ints)},
    ),
)
turn_detection = st.one_of(
    st.none(),
    st.fixed_dictionaries({}, optional={
        "type": wrong(st.sampled_from(["server_vad", "semantic_vad", "none"])),
        "threshold": wrong(st.floats(-1, 2) | st.sampled_from([0.0, 0.5, 1.0])),
        "prefix_padding_ms": wrong(ints), "silence_duration_ms": wrong(ints),
        "create_response": wrong(st.booleans()), "interrupt_response": wrong(st.booleans()),
        "idle_timeout_ms": wrong(ints), "eagerness": wrong(st.sampled_from(["low", "auto", "high"])),
    }),
)
audio_io = st.fixed_dictionaries({}, optional={
    "format": wrong(audio_format), "turn_detection": wrong(turn_detection), "voice": wrong(strings),
    "transcription": garbage, "noise_reduction": garbage,
})
session_config = st.fixed_dictionaries({}, optional={
    "type": wrong(st.sampled_from(["realtime", "transcription"])), "instructions": wrong(strings),
    "output_modalities": wrong(modalities), "modalities": wrong(modalities),
    "audio": wrong(st.fixed_dictionaries({}, optional={"input": wrong(audio_io), "output": wrong(audio_io)})),
    "input_audio_format": wrong(audio_format), "output_audio_format": wrong(audio_format),
    "turn_detection": wrong(turn_detection), "voice": wrong(strings),
    "max_output_tokens": wrong(ints | st.just("inf")), "max_response_output_tokens": wrong(ints | st.just("inf")),
    "tools": garbage, "tool_choice": garbage, "temperature": wrong(floats), "model": wrong(strings),
})
content_part = st.fixed_dictionaries(
    {"type": wrong(st.sampled_from(["input_text", "input_audio", "input_image", "text", "output_text",
                                    "input_file", "audio"]))},
    optional={"text": wrong(strings), "audio": wrong(audio_b64), "image_url": wrong(images),
              "transcript": wrong(strings), "detail": garbage},
)
item = st.fixed_dictionaries(
    {"content": wrong(st.lists(content_part, max_size=4))},
    optional={"id": wrong(strings), "type": wrong(st.sampled_from(["message", "function_call"])),
              "role": wrong(st.sampled_from(["user", "user", "system", "assistant", "tool"])),
              "status": garbage, "object": garbage},
)
response_config = st.fixed_dictionaries({}, optional={
    "output_modalities": wrong(modalities), "modalities": wrong(modalities), "instructions": wrong(strings),
    "conversation": wrong(st.sampled_from(["auto", "none"])), "metadata": garbage, "input": garbage,
})


def _event(kind: str | st.SearchStrategy, required: dict | None = None, optional: dict | None = None):
    kind_strategy = kind if isinstance(kind, st.SearchStrategy) else st.just(kind)
    return st.fixed_dictionaries(
        {"type": kind_strategy, **(required or {})},
        optional={"event_id": wrong(strings), "extra_field": garbage, **(optional or {})},
    )


valid_looking = st.one_of(
    _event(st.sampled_from(["session.update", "transcription_session.update"]), {"session": wrong(session_config)}),
    _event("input_audio_buffer.append", {"audio": wrong(audio_b64)}),
    _event("input_audio_buffer.append", {"audio": wrong(audio_b64)}),
    _event("input_audio_buffer.commit"),
    _event("input_audio_buffer.clear"),
    _event("conversation.item.create", {"item": wrong(item)}, {"previous_item_id": wrong(ids)}),
    _event("conversation.item.create", {"item": wrong(item)}),
    _event("conversation.item.truncate", {"item_id": wrong(ids), "audio_end_ms": wrong(ints)},
           {"content_index": wrong(ints)}),
    _event("conversation.item.delete", {"item_id": wrong(ids)}),
    _event("conversation.item.retrieve", {"item_id": wrong(ids)}),
    _event("output_audio_buffer.clear"),
    _event("response.create", {}, {"response": wrong(response_config)}),
    _event("response.cancel", {}, {"response_id": wrong(ids)}),
    _event("vita.frame.append", {"image": wrong(images)}),
    _event("vita.text.append", {"text": wrong(strings)}),
)
near_miss_types = st.sampled_from([
    "session.updated", "Session.Update", "response.create ", " response.create", "response", "error",
    "input_audio_buffer.append\x00", "vita.", "vita.frame", "conversation.item.retrieved", "output_audio_buffer.cleared",
    "transcription_session.update ", "",
])
deep = st.builds(lambda n, opener: opener * n, st.integers(1, 5000), st.sampled_from(["[", '{"a":', '{"type":[']))
raw_text = st.one_of(
    strings,  # mostly not JSON; "null", "[]", "1e400"... are
    deep,
    st.builds(lambda n: "[" * n + "]" * n, st.integers(1, 5000)),
    st.builds(lambda s, n: json.dumps({"type": "vita.text.append", "text": (s * n)[:GIANT]}),
              st.text(min_size=1, max_size=3), st.integers(1, GIANT)),
    st.builds(lambda d: '{"type": "response.cancel", "event_id": ' + "9" * d + "}", st.integers(4000, 6000)),
    st.builds(lambda d: "1" * d, st.integers(4000, 6000)),
    st.sampled_from([
        '{"type": "response.cancel",}', '{"type": "response.cancel"} trailing', "\ufeff{\"type\": \"response.cancel\"}",
        '{"type": "response.cancel", "type": "nope"}', '{"type": NaN}', '{"type": "vita.text.append", "text": Infinity}',
        "{'type': 'response.cancel'}", '"response.cancel"', "[{}]", '{"type": "vita.text.append", "text": "\\ud800"}',
        '{"type": "nope", "event_id": "\\udfff"}',
        '{"type": "session.update", "session": {"audio": {"input": {"format": {"\\ud800": 1}}}}}',
        '{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 1e999}}}}}',
        '{"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": 1e308}',
        '{"type": "session.update", "session": {"instructions": "\\udc00"}}',
    ]),
)


def _with_surrogate(obj: Any, text: str, k: int) -> Any:
    """`obj` with its k-th string (value or key, modulo their count) replaced by `text` (a lone surrogate in
    it): lone surrogates are valid JSON escapes but no text, so they go in one place per frame."""
    spots: list[tuple[Any, Any, bool]] = []  # (container, key or index, is_a_key)

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                spots.append((node, key, True))
                if isinstance(value, str):
                    spots.append((node, key, False))
                walk(value)
        elif isinstance(node, list):
            for i, value in enumerate(node):
                if isinstance(value, str):
                    spots.append((node, i, False))
                walk(value)

    obj = copy.deepcopy(obj)
    walk(obj)
    if not spots:
        return text if isinstance(obj, str) or obj is None else obj
    container, key, is_key = spots[k % len(spots)]
    if is_key:
        container[text] = container.pop(key)
    else:
        container[key] = text
    return obj


@dataclass
class Frame:
    kind: str  # "json" (obj is serialized), "raw" (text as is), "binary"
    obj: Any = None
    text: str = ""
    data: bytes = b""
    escape: bool = True  # json.dumps(ensure_ascii=...)
    assign_id: bool = False  # a unique string event_id is added (objects without one)


frames = st.one_of(
    st.builds(Frame, st.just("json"), st.builds(_with_surrogate, valid_looking, surrogate_text, st.integers(0, 99)),
              escape=st.just(True), assign_id=st.booleans()),
    st.builds(Frame, st.just("json"), valid_looking, escape=st.booleans(), assign_id=st.booleans()),
    st.builds(Frame, st.just("json"), valid_looking, escape=st.booleans(), assign_id=st.booleans()),
    st.builds(Frame, st.just("json"), valid_looking, escape=st.booleans(), assign_id=st.booleans()),
    st.builds(Frame, st.just("json"), valid_looking, escape=st.booleans(), assign_id=st.booleans()),
    st.builds(Frame, st.just("json"), _event(near_miss_types | strings), escape=st.booleans(),
              assign_id=st.booleans()),
    st.builds(Frame, st.just("json"), garbage, escape=st.booleans(), assign_id=st.booleans()),
    st.builds(Frame, st.just("json"), st.dictionaries(strings, garbage, max_size=5), escape=st.booleans(),
              assign_id=st.booleans()),
    st.builds(Frame, st.just("raw"), text=raw_text),
    st.builds(Frame, st.just("binary"), data=st.one_of(st.binary(max_size=64), audio_bytes)),
)


# --- the oracle ------------------------------------------------------------------------------------------


def expected_codes(payload: str | bytes) -> frozenset[str] | None:
    """Which error codes this frame must get (ANY: some code), or None when it is a well-formed event (it
    may still get a semantic error, e.g. undecodable audio), or UNSURE (no check either way)."""
    if isinstance(payload, bytes):
        return frozenset({"binary_not_supported"})
    if len(payload) > MAX_EVENT_BYTES:
        return frozenset({"event_too_large"})
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        # Not JSON, or JSON that Python cannot load (nesting deeper than the recursion limit, integers over
        # 4300 digits): either way the server can only refuse it.
        return ANY if not isinstance(_json_error(payload), json.JSONDecodeError) else frozenset({"invalid_json"})
    if _depth(data) > 200 or _has_lone_surrogate(data):
        # Python's JSON decoder recurses: how deep the server can go depends on its own stack depth. Lone
        # surrogates ("\\ud800") are valid JSON but no text: the server may refuse them anywhere (or drop them).
        inner = expected_codes_parsed(payload, data)
        return UNSURE if inner is None or inner is ANY else inner | {"invalid_json", "invalid_value"}
    return expected_codes_parsed(payload, data)


def expected_codes_parsed(payload: str, data: Any) -> frozenset[str] | None:
    if not isinstance(data, dict):
        return frozenset({"invalid_event"})
    kind = data.get("type")
    if not isinstance(kind, str):
        return frozenset({"missing_type"})
    if ALIASES.get(kind, kind) not in KNOWN_TYPES:
        return frozenset({"unknown_event_type"})
    try:
        parse_client_event(payload)
    except ProtocolError as exc:
        return frozenset({exc.code})
    return None


def _has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    except (ValueError, RecursionError):
        return False
    return False


def _depth(value: Any) -> int:
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


def _json_error(payload: str) -> BaseException | None:
    try:
        json.loads(payload)
    except (ValueError, RecursionError) as exc:
        return exc
    return None


def seen_event_id(payload: str | bytes) -> str | None:
    """The event_id the server can read from this frame (a string at the top level)."""
    if isinstance(payload, bytes):
        return None
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    value = data.get("event_id") if isinstance(data, dict) else None
    if _has_lone_surrogate(data):
        return None  # refused before its event_id is read, maybe; counted with the anonymous errors
    return value if isinstance(value, str) else None


# --- connections -----------------------------------------------------------------------------------------


class LoopThread:
    """An asyncio loop in a thread, so the long-lived sockets outlive each (synchronous) hypothesis example."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="fuzz-loop")
        self.thread.start()

    def run(self, coro: Awaitable[Any], timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class LaneClosed(AssertionError):
    pass


@dataclass
class Lane:
    """One long-lived realtime connection whose server events are drained as they come."""

    url: str
    index: int
    ws: Any = None
    inbox: list[dict] = field(default_factory=list)
    cases: int = 0
    serial: int = 0
    assistant_item: str = "item_none"
    user_item: str = "item_none"
    response_id: str = "resp_none"
    active: set[str] = field(default_factory=set)
    _wake: asyncio.Event | None = None
    _reader: asyncio.Task | None = None
    close_info: str | None = None
    last_payloads: list[str | bytes] = field(default_factory=list)

    async def open(self) -> None:
        ws_url = self.url.replace("http://", "ws://") + "/v1/realtime?model=vita"
        self.ws = await websockets.connect(ws_url, additional_headers=AUTH, max_size=None, open_timeout=30)
        self.inbox, self.cases, self.active, self.close_info = [], 0, set(), None
        self._wake = asyncio.Event()
        self._reader = asyncio.create_task(self._drain())
        await self.wait_for(lambda e: e["type"] == "session.created", 0, 30)

    async def _drain(self) -> None:
        try:
            async for message in self.ws:
                event = json.loads(message)
                self.inbox.append(event)
                kind = event.get("type")
                if kind == "response.created":
                    self.response_id = event["response"]["id"]
                    self.active.add(self.response_id)
                elif kind == "response.done":
                    self.active.discard(event["response"]["id"])
                elif kind == "response.output_item.added":
                    self.assistant_item = event["item"]["id"]
                elif kind == "conversation.item.added" and event["item"].get("role") == "user":
                    self.user_item = event["item"]["id"] or self.user_item
                self._wake.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            code, reason = self.ws.close_code, self.ws.close_reason
            self.close_info = f"code={code} reason={reason!r}" if code is not None else "closed without a close frame"
            self._wake.set()

    async def wait_for(self, predicate: Callable[[dict], bool], start: int, timeout: float) -> int:
        i = start
        try:
            async with asyncio.timeout(timeout):
                while True:
                    while i < len(self.inbox):
                        if predicate(self.inbox[i]):
                            return i
                        i += 1
                    if self.close_info is not None:
                        raise LaneClosed(f"lane {self.index}: the server closed the socket ({self.close_info})")
                    self._wake.clear()
                    await self._wake.wait()
        except TimeoutError:
            raise AssertionError(f"lane {self.index}: nothing matching within {timeout} s; last events: "
                                 f"{[e.get('type') for e in self.inbox[-20:]]}") from None

    def payload(self, frame: Frame) -> str | bytes:
        if frame.kind == "binary":
            return frame.data
        if frame.kind == "raw":  # a text frame must be UTF-8: lone surrogates travel as "\\udxxx" escapes
            return frame.text.encode("utf-8", "backslashreplace").decode()
        obj = _replace_placeholders(copy.deepcopy(frame.obj), self)
        if isinstance(obj, dict):
            self.serial += 1
            if isinstance(obj.get("event_id"), str):
                obj["event_id"] = f"{obj['event_id']}#{self.index}.{self.serial}"  # weird, but unique
            elif "event_id" not in obj and frame.assign_id:
                obj["event_id"] = f"ev{self.index}.{self.serial}"
        text = json.dumps(obj, ensure_ascii=frame.escape)
        try:
            text.encode()
        except UnicodeEncodeError:  # lone surrogates can only travel escaped
            text = json.dumps(obj, ensure_ascii=True)
        return text

    async def send_batch(self, batch: list[Frame]) -> tuple[list[str | bytes], list[dict]]:
        """Send the frames and a sentinel; return the payloads and the events that came before the sentinel's
        error (the server answers events in order, so every synchronous error of the batch is among them)."""
        start = len(self.inbox)
        payloads = [self.payload(f) for f in batch]
        self.last_payloads = payloads
        try:
            for payload in payloads:
                await self.ws.send(payload)
        except websockets.ConnectionClosed:
            await asyncio.sleep(0.1)
            raise LaneClosed(f"lane {self.index}: the server closed the socket ({self.close_info})") from None
        self.cases += len(batch)
        self.serial += 1
        sentinel = f"sentinel{self.index}.{self.serial}"
        await self.ws.send(json.dumps({"type": "conversation.item.delete", "item_id": "x", "event_id": sentinel}))
        end = await self.wait_for(
            lambda e: e.get("type") == "error" and e["error"].get("event_id") == sentinel, start, 120
        )
        return payloads, self.inbox[start:end]

    async def prove_alive(self, question: str = "Hello, are you there?") -> dict:
        """After the fuzz: the session still answers a typed question (retrying around fuzz leftovers: an answer
        still running, or pending fuzz items that make a prompt the engine refuses)."""
        await self.ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["text"], "instructions": "",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None}}}}))
        await self.ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
        failures = []
        for _attempt in range(4):
            if self.active:
                await self.ws.send(json.dumps({"type": "response.cancel"}))
                deadline = time.monotonic() + 60
                while self.active and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    if self.close_info is not None:
                        raise LaneClosed(f"lane {self.index}: closed while cancelling ({self.close_info})")
            start = len(self.inbox)
            await self.ws.send(json.dumps({"type": "conversation.item.create", "item": {
                "type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}}))
            await self.ws.send(json.dumps({"type": "response.create"}))
            index = await self.wait_for(
                lambda e: e["type"] == "response.created"
                or (e["type"] == "error" and e["error"]["code"] in ("conversation_already_has_active_response",
                                                                    "response_create_without_input")),
                start, 120,
            )
            created = self.inbox[index]
            if created["type"] == "error":
                failures.append(created["error"])
                continue
            rid = created["response"]["id"]
            done_at = await self.wait_for(
                lambda e, rid=rid: e["type"] == "response.done" and e["response"]["id"] == rid, index, 180
            )
            done = self.inbox[done_at]
            text = "".join(e.get("delta", "") for e in self.inbox[index:done_at]
                           if e["type"] == "response.output_text.delta" and e.get("response_id") == rid)
            if done["response"]["status"] in ("completed", "incomplete") and text:
                return {"text": text, "failures": failures}
            failures.append(done["response"])
        raise AssertionError(f"lane {self.index}: the session no longer answers a typed question: {failures}")

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
            if self._reader is not None:
                with contextlib.suppress(BaseException):
                    await self._reader


def _replace_placeholders(obj: Any, lane: Lane) -> Any:
    if isinstance(obj, str):
        return {ASSISTANT_ITEM: lane.assistant_item, RESPONSE_ID: lane.response_id, USER_ITEM: lane.user_item}.get(
            obj, obj)
    if isinstance(obj, list):
        return [_replace_placeholders(v, lane) for v in obj]
    if isinstance(obj, dict):
        return {k: _replace_placeholders(v, lane) for k, v in obj.items()}
    return obj


def check_batch(lane: Lane, payloads: list[str | bytes], events: list[dict]) -> collections.Counter:
    """Every invalid frame got an error naming a code; every error is well formed and documented."""
    errors = [e for e in events if e.get("type") == "error"]
    codes: collections.Counter = collections.Counter()
    for error in errors:
        body = error.get("error")
        assert isinstance(body, dict), error
        code, message = body.get("code"), body.get("message")
        assert isinstance(code, str) and code, f"error without a code: {error}"
        assert isinstance(message, str) and message, f"error without a message: {error}"
        assert code in KNOWN_CODES, f"undocumented error code {code!r}: {str(error)[:500]}"
        codes[code] += 1
    expected = [(expected_codes(p), seen_event_id(p), p) for p in payloads]
    id_counts = collections.Counter(eid for _, eid, _ in expected if eid is not None)
    by_id: dict[str, list[dict]] = collections.defaultdict(list)
    anonymous: collections.Counter = collections.Counter()
    for error in errors:
        eid = error["error"].get("event_id")
        if isinstance(eid, str) and id_counts.get(eid) == 1:
            by_id[eid].append(error["error"])
        else:
            anonymous[error["error"]["code"]] += 1
    wanted_anonymous: collections.Counter = collections.Counter()
    for want, eid, payload in expected:
        if want is UNSURE:
            continue
        if eid is not None and id_counts[eid] == 1:
            got = [e["code"] for e in by_id.get(eid, [])]
            if want is not None:
                assert got, f"lane {lane.index}: no error for invalid frame {_short(payload)} (expected {set(want)})"
                assert want is ANY or set(got) & want, (
                    f"lane {lane.index}: frame {_short(payload)} got {got}, expected one of {set(want)}")
            else:
                stray = [c for c in got if c in PARSE_CODES]
                assert not stray, f"lane {lane.index}: well-formed frame {_short(payload)} refused with {stray}"
        elif want is not None:
            wanted_anonymous[next(iter(want)) if len(want) == 1 and want is not ANY else "*"] += 1
    for code, n in wanted_anonymous.items():
        if code != "*":
            assert anonymous[code] >= n, (
                f"lane {lane.index}: {n} frames needed a {code!r} error, got {anonymous[code]}; frames: "
                + "; ".join(_short(p) for w, e, p in expected if w is not None and code in w))
    assert sum(anonymous.values()) >= sum(wanted_anonymous.values()), (
        f"lane {lane.index}: {sum(wanted_anonymous.values())} invalid frames without an event_id, only "
        f"{sum(anonymous.values())} anonymous errors")
    return codes


def _wait_gauges_zero(http: httpx.Client, names: tuple[str, ...], within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while True:
        text = http.get("/metrics").text
        values = [float(m.group(1)) for name in names
                  for m in [re.search(rf"^{name} (\S+)$", text, re.MULTILINE)] if m]
        if len(values) == len(names) and not any(values):
            return True
        if time.monotonic() > deadline:
            print(f"gauges still up: {[(n, v) for n, v in zip(names, values, strict=False)]}")
            return False
        time.sleep(0.1)


def _short(payload: str | bytes, n: int = 160) -> str:
    text = repr(payload)
    return text if len(text) <= n else f"{text[:n]}...({len(payload)} chars)"


def _suspects(payloads: list[str | bytes]) -> str:
    """Frames the server's own parser cannot even refuse cleanly (run here, in the test process)."""
    out = []
    for p in payloads:
        if isinstance(p, bytes) or len(p) > MAX_EVENT_BYTES:
            continue
        try:
            parse_client_event(p)
        except ProtocolError as exc:
            try:
                json.dumps(exc.as_error().model_dump(), ensure_ascii=False).encode()
            except UnicodeEncodeError as bad:
                out.append(f"{_short(p)} -> its error event cannot be sent as UTF-8 ({bad.reason}: "
                           f"{bad.object[bad.start:bad.end]!r})")
        except BaseException as exc:  # noqa: BLE001 - reported
            out.append(f"{_short(p)} -> {type(exc).__name__}: {str(exc)[:100]}")
    return "\n".join(out) or "(none fails in parse_client_event; see the server log)"


def _seeded(test: Callable) -> Callable:
    return test if SEED == "random" else seed(int(SEED))(test)


def _failures_in_log(log: str, limit: int = 6000) -> str:
    """The server's tracebacks (a 1011 close logs one as "session failed"), else the log's tail."""
    lines = log.splitlines()
    starts = [i for i, line in enumerate(lines) if "session failed" in line or "Traceback" in line]
    if not starts:
        return log[-limit // 2:]
    return "\n".join(lines[starts[0]:starts[0] + 80])[:limit]


# --- the tests -------------------------------------------------------------------------------------------


def test_realtime_fuzz_keeps_every_session_alive(server, server_url: str) -> None:
    loop = LoopThread()
    lanes = [Lane(server_url, i) for i in range(LANES)]
    http = httpx.Client(base_url=server_url, timeout=10)
    stats = {"cases": 0, "batches": 0, "retired": 0, "codes": collections.Counter(), "gen_s": 0.0}
    last = [time.monotonic()]

    def server_alive(context: str) -> None:
        assert server.proc.poll() is None, f"the server process died ({context}):\n{server.log()[-3000:]}"
        assert http.get("/health").status_code == 200, f"/health failed ({context})"

    async def open_all() -> None:
        await asyncio.gather(*(lane.open() for lane in lanes))

    async def close_all() -> None:
        await asyncio.gather(*(lane.close() for lane in lanes), return_exceptions=True)

    async def run_lanes(parts: list[list[Frame]]) -> list[tuple[list, list]]:
        return await asyncio.gather(*(lane.send_batch(part) for lane, part in zip(lanes, parts, strict=True)))

    async def retire(lane: Lane) -> None:
        await lane.prove_alive()
        await lane.close()
        await lane.open()

    try:
        loop.run(open_all(), 60)
        started = time.monotonic()

        @_seeded
        @settings(
            max_examples=max(1, -(-CASES // BATCH)), deadline=None, database=None, derandomize=False,
            phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
            report_multiple_bugs=False, verbosity=Verbosity.quiet,  # the assertion names the frames: the
        )  # whole batch's repr would be hundreds of kB
        @given(batch=st.lists(frames, min_size=BATCH, max_size=BATCH))
        def fuzz(batch: list[Frame]) -> None:
            stats["gen_s"] += time.monotonic() - last[0]
            parts = [batch[i::LANES] for i in range(LANES)]
            try:
                results = loop.run(run_lanes(parts), 300)
            except LaneClosed as exc:
                payloads = [p for lane in lanes for p in lane.last_payloads]
                server_alive("after a socket closed")
                raise AssertionError(f"{exc}\nframes the parser itself fails on:\n{_suspects(payloads)}"
                                     f"\nserver log:\n{_failures_in_log(server.log())}") from None
            for lane, (payloads, events) in zip(lanes, results, strict=True):
                assert lane.close_info is None, f"lane {lane.index} closed: {lane.close_info}"
                stats["codes"] += check_batch(lane, payloads, events)
            server_alive(f"after batch {stats['batches']}")
            stats["cases"] += len(batch)
            stats["batches"] += 1
            for lane in lanes:
                if lane.cases >= CONNECTION_CASES:
                    loop.run(retire(lane), 600)
                    stats["retired"] += 1
            last[0] = time.monotonic()

        fuzz()
        elapsed = time.monotonic() - started
        for lane in lanes:  # every connection ends with a typed question answered
            loop.run(lane.prove_alive(), 600)
        server_alive("at the end")
        loop.run(close_all(), 30)
        # Nothing leaks: every session and engine request of the fuzzed connections is gone.
        assert _wait_gauges_zero(http, ("vita_sessions", "vita_engine_requests_in_flight"), 20), (
            "sessions or engine requests left over after the fuzzed connections closed")
        rate = stats["cases"] / elapsed
        print(f"\nrealtime fuzz: {stats['cases']} cases in {elapsed:.1f} s = {rate:.0f} cases/s "
              f"({stats['gen_s']:.1f} s generating; {stats['retired'] + LANES} connections); "
              f"errors by code: {dict(stats['codes'].most_common())}")
        assert stats["cases"] >= CASES
    finally:
        with contextlib.suppress(Exception):
            loop.run(close_all(), 30)
        loop.close()
        http.close()


# --- schemathesis over the OpenAPI schema ----------------------------------------------------------------

SCHEMATHESIS_EXAMPLES = int(os.environ.get("VITA_SCHEMATHESIS_EXAMPLES", "150"))  # per operation and mode
SCHEMATHESIS_REPAIRED = int(os.environ.get("VITA_SCHEMATHESIS_REPAIRED", "20"))  # chat bodies that generate


def _bind_mode(check: Callable[..., None], mode: Any) -> Callable[[Any], None]:
    def run(case: Any) -> None:
        check(case, mode=mode)

    return run


def test_schemathesis_no_server_errors(server_url: str) -> None:
    """Every operation with schema-valid and schema-invalid inputs, plus chat bodies repaired into requests the
    engine runs (schema-valid bodies are mostly refused by the checks JSON Schema cannot express: the last
    message from the user, n == 1): no 5xx but 503 (at capacity / not ready, with a code)."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation.modes import GenerationMode

    raw = httpx.get(server_url + "/openapi.json", headers=AUTH, timeout=10).json()
    body = raw["paths"]["/v1/chat/completions"]["post"].get("requestBody")
    assert body, "the chat endpoint's request body is not in /openapi.json"
    schema = schemathesis.openapi.from_dict(raw)
    seen: collections.Counter = collections.Counter()
    http_errors: list[str] = []
    session = requests.Session()
    started = time.monotonic()

    def check(case, *, mode: str) -> None:  # type: ignore[no-untyped-def]
        if isinstance(case.body, dict) and case.operation.path == "/v1/chat/completions":
            if mode == "repaired":
                _repair_chat_body(case.body)
                if case.body.get("max_tokens") is None and case.body.get("max_completion_tokens") is None:
                    case.body["max_tokens"] = 8
            # Generation is real (a tiny model on CPU): keep any one answer short.
            for key in ("max_tokens", "max_completion_tokens"):
                if isinstance(case.body.get(key), int) and case.body[key] > 16:
                    case.body[key] = 16
        # A copy each time: schemathesis adds the transport's headers (Connection: keep-alive...) to the dict
        # it is given, and AUTH is shared with the WebSocket tests.
        response = case.call(base_url=server_url, session=session, headers=dict(AUTH), timeout=120)
        seen[(case.operation.label, mode, response.status_code)] += 1
        if response.status_code == 503:
            assert response.json()["error"]["code"], response.text
            return
        if response.status_code >= 500:
            http_errors.append(f"{case.operation.label} {response.status_code}: {response.text[:300]} "
                               f"<- {str(case.body)[:300]}")
            return
        case.validate_response(response, checks=[not_a_server_error], headers=dict(AUTH))

    for result in schema.get_all_operations():
        operation = result.ok()
        runs = [("positive", GenerationMode.POSITIVE, SCHEMATHESIS_EXAMPLES)]
        if operation.method.upper() != "GET":  # GETs without parameters: nothing to break
            runs += [("negative", GenerationMode.NEGATIVE, SCHEMATHESIS_EXAMPLES),
                     ("repaired", GenerationMode.POSITIVE, SCHEMATHESIS_REPAIRED)]
        for mode, generation_mode, examples in runs:
            run = settings(max_examples=examples, deadline=None, database=None,
                           suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])(
                given(case=operation.as_strategy(generation_mode=generation_mode))(_bind_mode(check, mode)))
            run()
    print(f"\nschemathesis: {sum(seen.values())} requests in {time.monotonic() - started:.1f} s: "
          f"{dict(sorted(seen.items()))}")
    assert not http_errors, "\n".join(http_errors)


def _repair_chat_body(body: dict) -> None:
    """Make a schema-valid chat body one the server runs: it ends with a user text turn, n is 1."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        last = messages[-1]
        content = last.get("content") if isinstance(last, dict) else None
        text = content if isinstance(content, str) and content.strip() else "Say something."
        messages[-1] = {"role": "user", "content": text}
    body.pop("n", None)
    if body.get("modalities") is not None and set(body["modalities"]) not in ({"text"}, {"text", "audio"}):
        body["modalities"] = ["text"]


# --- what the fuzzers found, as plain regression tests ----------------------------------------------------

HOSTILE_EVENTS = {
    "deep-nesting": "[" * 100_000 + "]" * 100_000,
    "deep-object": '{"type": "session.update", "session": ' + '{"a": ' * 50_000 + "1" + "}" * 50_001,
    "5000-digit-number": "1" * 5000,
    "5000-digit-event-id": '{"type": "response.cancel", "event_id": ' + "9" * 5000 + "}",
    "surrogate-event-id": '{"type": "no.such.event", "event_id": "\\ud800"}',
    "surrogate-format-key": '{"type": "session.update", "session": {"audio": {"input": {"format": {"\\udc00": 1}}}}}',
    "blank-text-append": '{"type": "vita.text.append", "text": " \\n\\t"}',
    "separator-text-append": '{"type": "vita.text.append", "text": "\\u001f\\u001c"}',  # blank to str.strip only
    "surrogate-text-append": '{"type": "vita.text.append", "text": "hi \\ud800"}',
    "surrogate-instructions": '{"type": "session.update", "session": {"instructions": "be \\udfff brief"}}',
    "surrogate-item-text": '{"type": "conversation.item.create", "item": {"type": "message", "role": "user", '
                           '"content": [{"type": "input_text", "text": "a\\ud800b"}]}}',
    "surrogate-response-instructions": [
        '{"type": "session.update", "session": {"audio": {"input": {"turn_detection": null}}}}',
        ('{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [{"type": '
         '"input_text", "text": "hi"}]}}'),
        '{"type": "response.create", "response": {"instructions": "\\ud83d"}}',
    ],
}


@pytest.mark.parametrize("payload", list(HOSTILE_EVENTS.values()), ids=list(HOSTILE_EVENTS))
async def test_hostile_realtime_events_get_an_error_and_the_session_survives(
    server_url: str, payload: str | list[str]
) -> None:
    """Each of these closed the session with 1011 (an exception escaped the reader or the writer) or would
    have crashed the next answer (a lone surrogate reaching the tokenizer)."""
    ws_url = server_url.replace("http://", "ws://") + "/v1/realtime?model=vita"
    async with websockets.connect(ws_url, additional_headers=AUTH, max_size=None) as ws:

        async def until(predicate: Callable[[dict], bool], timeout: float = 30) -> list[dict]:
            seen = []
            async with asyncio.timeout(timeout):
                while True:
                    seen.append(json.loads(await ws.recv()))
                    if predicate(seen[-1]):
                        return seen

        await until(lambda e: e["type"] == "session.created")
        for text in [payload] if isinstance(payload, str) else payload:
            await ws.send(text)
        await ws.send(json.dumps({"type": "conversation.item.delete", "item_id": "x", "event_id": "sentinel"}))
        events = await until(lambda e: e["type"] == "error" and e["error"].get("event_id") == "sentinel")
        if isinstance(payload, str):  # a response's refusal may come after the sentinel: not checked here
            errors = [e["error"] for e in events[:-1] if e["type"] == "error"]
            assert errors, f"no error event for {payload[:120]!r}: {[e['type'] for e in events]}"
            assert all(e["code"] in KNOWN_CODES and e["message"] for e in errors), errors
        await ws.send(json.dumps({"type": "response.cancel"}))  # whatever may still run
        # the session still answers a typed question
        await ws.send(json.dumps({"type": "session.update", "session": {"output_modalities": ["text"]}}))
        await ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello?"}]}}))
        await ws.send(json.dumps({"type": "response.create"}))
        events = await until(lambda e: e["type"] == "response.done" and e["response"]["status"] != "cancelled", 120)
        assert events[-1]["response"]["status"] in ("completed", "incomplete"), events[-1]
        assert any(e["type"] == "response.output_text.delta" for e in events)


HOSTILE_BODIES = {
    "deep-nesting": "[" * 100_000 + "]" * 100_000,
    "5000-digit-number": '{"model": "vita", "max_tokens": ' + "1" * 5000 + ', "messages": [{"role": "user", '
                         '"content": "hi"}]}',
    "surrogate-text": '{"model": "vita", "max_tokens": 4, "messages": [{"role": "user", "content": "hi \\ud800"}]}',
    "surrogate-part": '{"model": "vita", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": '
                      '"text", "text": "\\udfff"}]}]}',
    "surrogate-system": '{"model": "vita", "max_tokens": 4, "messages": [{"role": "system", "content": "\\ud800"}, '
                        '{"role": "user", "content": "hi"}]}',
    # 4 samples of 16 kHz PCM: shorter than the audio encoder's minimum (85 ms), refused only inside the engine
    "tiny-pcm16-audio": '{"model": "vita", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": '
                        '"text", "text": "hi"}, {"type": "input_audio", "input_audio": {"data": "AAAAAAAAAAA=", '
                        '"format": "pcm16"}}]}]}',
}


@pytest.mark.parametrize("body", list(HOSTILE_BODIES.values()), ids=list(HOSTILE_BODIES))
def test_hostile_chat_bodies_are_400_not_500(server_url: str, body: str) -> None:
    response = httpx.post(server_url + "/v1/chat/completions", content=body.encode(), timeout=120,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert response.json()["error"]["code"]
