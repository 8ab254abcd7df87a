"""server/ws_protocol.py's own parsing of text frames (issue 14, switch "wsframe") against websockets' parser
as uvicorn runs it: the protocol class driven directly with a fake transport, where every write and queued
message of the two can be compared, and through a real uvicorn server on a real socket."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import socket
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
import websockets
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side, State
from websockets.utils import apply_mask

from server.ws_protocol import ParsedByWebsocketsProtocol, ReadAheadWebSocketProtocol

MAX_SIZE = 1 << 17  # the servers' ws_max_size here: a 64-bit-length frame fits, MAX_SIZE + 1 does not
PROTOCOLS = {"fast": ReadAheadWebSocketProtocol, "wsframe off": ParsedByWebsocketsProtocol}
HANDSHAKE = (b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")
OFFER_DEFLATE = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
APPEND = json.dumps({"type": "input_audio_buffer.append", "audio": "QUJD" * 240})  # a 20 ms event's size
# Texts of every length encoding (7-bit up to 125, 16-bit from 126), empty, and not ASCII.
TEXTS = ["", "a", "hé ✓ 🙂", "x" * 125, "y" * 126, "z" * 300, APPEND]


def frame(payload: bytes | str, opcode: int = Opcode.TEXT, *, fin: bool = True, rsv: int = 0,
          mask: bool = True) -> bytes:
    """A client frame, built by hand so that it can break the rules websockets' serializer enforces."""
    data = payload.encode() if isinstance(payload, str) else payload
    n = len(data)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    mask_bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mask_bit | n])
    elif n < 1 << 16:
        head += bytes([mask_bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + data
    key = bytes([(n * 7 + i * 31 + 1) & 0xFF for i in range(4)])  # never all zero: a skipped unmask shows
    return head + key + apply_mask(data, key)


def texts(*payloads: str) -> bytes:
    return b"".join(frame(p) for p in payloads)


def close_frame(code: int = 1000, reason: str = "") -> bytes:
    return frame(code.to_bytes(2, "big") + reason.encode(), Opcode.CLOSE)


def server_frames(written: bytes) -> list[Frame]:
    """The frames the server wrote, parsed as a client does."""
    client = Protocol(Side.CLIENT, state=State.OPEN, max_size=None)
    client.receive_data(written)
    return [e for e in client.events_received() if isinstance(e, Frame)]


def close_code(frames: list[Frame]) -> int | None:
    closes = [f for f in frames if f.opcode is Opcode.CLOSE]
    return int.from_bytes(closes[0].data[:2], "big") if closes else None


# ---- the protocol class with a fake transport ----------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


@dataclass
class Connection:
    """A protocol after its handshake, whose application accepted and never reads: the test reads its queue."""
    protocol: ReadAheadWebSocketProtocol
    transport: FakeTransport
    stop: asyncio.Event
    parsed_by_websockets: list[int] = field(default_factory=list)  # sizes given to websockets' receive_data

    def feed(self, *chunks: bytes) -> None:
        for chunk in chunks:
            if not self.transport.closed:  # asyncio reads no more once the transport is closed
                self.protocol.data_received(chunk)

    def messages(self) -> list[dict[str, Any]]:
        out = []
        while not self.protocol.queue.empty():
            out.append(self.protocol.queue.get_nowait())
        return out

    def sent(self) -> bytes:
        return b"".join(self.transport.written)


async def _open(cls: type[ReadAheadWebSocketProtocol], *, deflate: bool = False, before_accept: bytes = b"",
                **config: Any) -> Connection:
    stop = asyncio.Event()

    async def app(scope: Any, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await stop.wait()

    cfg = uvicorn.Config(app, ws_max_size=MAX_SIZE, ws_per_message_deflate=deflate, log_level="warning", **config)
    cfg.load()
    protocol = cls(config=cfg, server_state=ServerState(), app_state={}, _loop=asyncio.get_running_loop())
    conn = Connection(protocol, FakeTransport(), stop)
    protocol.connection_made(conn.transport)  # type: ignore[arg-type]
    receive_data = protocol.conn.receive_data

    def counted(data: bytes) -> None:
        conn.parsed_by_websockets.append(len(data))
        receive_data(data)

    protocol.conn.receive_data = counted  # type: ignore[method-assign]
    protocol.data_received(HANDSHAKE + (OFFER_DEFLATE if deflate else b"") + b"\r\n" + before_accept)
    for _ in range(100):
        if protocol.conn.state is State.OPEN:
            break
        await asyncio.sleep(0)
    assert protocol.conn.state is State.OPEN  # (the application took websocket.connect)
    conn.transport.written.clear()  # the 101 response (its Date header differs between two connections)
    conn.parsed_by_websockets.clear()
    return conn


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Any]]:
    opened: list[Connection] = []

    async def open_connection(cls: type[ReadAheadWebSocketProtocol] = ReadAheadWebSocketProtocol,
                              **kwargs: Any) -> Connection:
        opened.append(await _open(cls, **kwargs))
        return opened[-1]

    yield open_connection
    for conn in opened:  # let the applications return
        conn.stop.set()
    await asyncio.sleep(0)


@dataclass
class Outcome:
    messages: list[dict[str, Any]]
    sent: bytes
    closed: bool
    parsed_by_websockets: list[int]


async def _run(connect: Callable[..., Any], cls: type[ReadAheadWebSocketProtocol], chunks: list[bytes],
               **kwargs: Any) -> Outcome:
    conn = await connect(cls, **kwargs)
    conn.feed(*chunks)
    return Outcome(conn.messages(), conn.sent(), conn.transport.closed, conn.parsed_by_websockets)


async def same_as_uvicorn(connect: Callable[..., Any], chunks: list[bytes], **kwargs: Any) -> Outcome:
    """What the fast path makes of these reads, asserted to be what websockets' parser (uvicorn) makes."""
    fast = await _run(connect, ReadAheadWebSocketProtocol, chunks, **kwargs)
    off = await _run(connect, ParsedByWebsocketsProtocol, chunks, **kwargs)
    assert (fast.messages, fast.sent, fast.closed) == (off.messages, off.sent, off.closed)
    return fast


def received(*payloads: str | bytes) -> list[dict[str, Any]]:
    return [{"type": "websocket.receive", "text" if isinstance(p, str) else "bytes": p} for p in payloads]


async def test_frames_split_at_every_byte_boundary_give_the_same_messages(connect: Callable[..., Any]) -> None:
    stream = texts(*TEXTS)
    for cls in PROTOCOLS.values():
        conn = await connect(cls)
        for k in range(len(stream) + 1):
            conn.feed(stream[:k], stream[k:])
            assert conn.messages() == received(*TEXTS), k
        conn.feed(*(stream[i:i + 1] for i in range(len(stream))))  # a byte at a time
        assert conn.messages() == received(*TEXTS)
        assert conn.sent() == b"" and not conn.transport.closed
        # the fast path parsed all of it itself; with "wsframe" off, websockets did
        assert bool(conn.parsed_by_websockets) == (cls is ParsedByWebsocketsProtocol)


async def test_64_bit_lengths_and_the_size_limit(connect: Callable[..., Any]) -> None:
    big, too_big = "b" * MAX_SIZE, "c" * (MAX_SIZE + 1)
    stream = texts("a", big, "d")
    chunks = [stream[i:i + 997] for i in range(0, len(stream), 997)]
    outcome = await same_as_uvicorn(connect, chunks)
    assert outcome.messages == received("a", big, "d") and not outcome.parsed_by_websockets
    # over the limit: 1009 as soon as the length is read (websockets' PayloadTooBig), the frame unread
    outcome = await same_as_uvicorn(connect, [texts("a"), frame(too_big)[:20]])
    assert outcome.messages[0] == received("a")[0] and outcome.messages[1]["code"] == 1009
    assert close_code(server_frames(outcome.sent)) == 1009 and outcome.closed
    # uvicorn drops the messages of a read that ends in a protocol error: so does the fast path
    outcome = await same_as_uvicorn(connect, [texts("a") + frame(too_big)[:20]])
    assert [m["type"] for m in outcome.messages] == ["websocket.disconnect"]


async def test_ping_mid_stream_is_answered_and_the_texts_around_it_arrive_in_order(
        connect: Callable[..., Any]) -> None:
    stream = texts("one", "two") + frame(b"are you there", Opcode.PING) + texts("three", APPEND)
    for k in range(len(stream) + 1):
        outcome = await same_as_uvicorn(connect, [stream[:k], stream[k:], texts("four")])
        assert outcome.messages == received("one", "two", "three", APPEND, "four")
        frames = server_frames(outcome.sent)
        assert [(f.opcode, f.data) for f in frames] == [(Opcode.PONG, b"are you there")]
        assert not outcome.closed
    # after the ping, reads of text frames are the fast path's again
    conn = await connect()
    conn.feed(stream)
    conn.parsed_by_websockets.clear()
    conn.feed(texts("five"), texts("six"))
    assert conn.messages()[-2:] == received("five", "six") and not conn.parsed_by_websockets


async def test_fragmented_message_goes_through_websockets(connect: Callable[..., Any]) -> None:
    chunks = [texts("before"), frame("ab", fin=False), frame(b"p", Opcode.PING),
              frame("cd", Opcode.CONT, fin=False), frame("ef", Opcode.CONT), texts("after")]
    outcome = await same_as_uvicorn(connect, chunks)
    assert outcome.messages == received("before", "abcdef", "after")
    assert [f.opcode for f in server_frames(outcome.sent)] == [Opcode.PONG]
    assert outcome.parsed_by_websockets[:4] == [len(c) for c in chunks[1:5]]  # and "after" was the fast path's
    assert len(outcome.parsed_by_websockets) == 4
    split = b"".join(chunks)  # the same stream in other reads
    outcome = await same_as_uvicorn(connect, [split[i:i + 5] for i in range(0, len(split), 5)])
    assert outcome.messages == received("before", "abcdef", "after")


async def test_a_text_frame_inside_a_fragmented_message_is_a_protocol_error(connect: Callable[..., Any]) -> None:
    outcome = await same_as_uvicorn(connect, [frame("ab", fin=False), texts("not a continuation")])
    assert close_code(server_frames(outcome.sent)) == 1002 and outcome.closed


async def test_binary_frames(connect: Callable[..., Any]) -> None:
    chunks = [texts("t"), frame(b"\x00\xffbytes", Opcode.BINARY), texts("u") + frame(b"\x01", Opcode.BINARY)]
    outcome = await same_as_uvicorn(connect, chunks)
    assert outcome.messages == received("t", b"\x00\xffbytes", "u", b"\x01")


@pytest.mark.parametrize("bad", [b"\xff", b"ok \xc3", "🙂".encode()[:3] + b"a"])
async def test_invalid_utf8_closes_with_1007(connect: Callable[..., Any], bad: bytes) -> None:
    outcome = await same_as_uvicorn(connect, [texts("fine"), frame(bad), texts("dropped")])
    assert outcome.messages[0] == received("fine")[0]
    assert outcome.messages[-1]["code"] == 1007 and outcome.closed
    assert close_code(server_frames(outcome.sent)) == 1007
    outcome = await same_as_uvicorn(connect, [texts("fine") + frame(bad) + frame(b"p", Opcode.PING)])
    assert close_code(server_frames(outcome.sent)) == 1007


@pytest.mark.parametrize("name, bad", [
    ("unmasked", frame("hello", mask=False)),
    ("rsv1 without an extension", frame("hello", rsv=4)),
    ("rsv3", frame("hello", rsv=1)),
    ("unknown opcode", frame("hello", 3)),
    ("continuation without a start", frame("hello", Opcode.CONT)),
    ("fragmented ping", frame(b"p", Opcode.PING, fin=False)),
    ("control frame over 125 bytes", frame(b"p" * 126, Opcode.PING)),
])
async def test_protocol_errors_close_with_1002(connect: Callable[..., Any], name: str, bad: bytes) -> None:
    for chunks in ([texts("fine"), bad], [texts("fine") + bad + texts("after")], [bad[:1], bad[1:]]):
        outcome = await same_as_uvicorn(connect, chunks)
        assert close_code(server_frames(outcome.sent)) == 1002, name
        assert outcome.closed and outcome.messages[-1]["code"] == 1002


async def test_close_handshake(connect: Callable[..., Any]) -> None:
    # the client closes; a text after its close frame in the same read is uvicorn's business, kept as is
    for chunks in ([texts("bye"), close_frame(1000, "done")], [texts("bye") + close_frame(1001) + texts("late")]):
        outcome = await same_as_uvicorn(connect, chunks)
        assert outcome.messages[0] == received("bye")[0] and outcome.closed
        assert server_frames(outcome.sent)[0].opcode is Opcode.CLOSE
    # the application closes while half a frame waits in the fast path's buffer: it goes to websockets whole,
    # its text is dropped (past websocket.close), and the client's reply completes the handshake
    outs = []
    for cls in PROTOCOLS.values():
        conn = await connect(cls)
        message = frame(APPEND)
        conn.feed(message[:700])
        await conn.protocol.send({"type": "websocket.close", "code": 1000})
        assert not conn.transport.closed
        conn.feed(message[700:] + texts("late"), close_frame(1000))
        outs.append((conn.messages(), conn.sent(), conn.transport.closed))
    assert outs[0] == outs[1]
    messages, sent, closed = outs[0]
    assert closed and messages == [{"type": "websocket.disconnect", "code": 1000, "reason": ""}]
    assert close_code(server_frames(sent)) == 1000


async def test_frames_sent_before_the_accept_go_through_websockets(connect: Callable[..., Any]) -> None:
    early = texts("early", "bird")
    conn = await connect(before_accept=early)  # parsed with the request, queued before the accept
    conn.feed(texts("now"), texts("then"))
    assert conn.messages() == received("early", "bird", "now", "then") and not conn.parsed_by_websockets
    # a frame cut short at the accept is in websockets' buffer: websockets parses until it is idle again
    conn = await connect(before_accept=early[:9])
    conn.feed(early[9:], texts("now"))
    assert conn.messages() == received("early", "bird", "now")
    assert conn.parsed_by_websockets == [len(early) - 9]


async def test_no_fast_path_with_permessage_deflate(connect: Callable[..., Any]) -> None:
    conn = await connect(deflate=True)
    assert conn.protocol.conn.extensions  # negotiated
    conn.feed(texts("plain"))  # an uncompressed frame: RSV1 clear, allowed with the extension
    assert conn.messages() == received("plain")
    assert conn.parsed_by_websockets == [len(texts("plain"))]


async def test_read_ahead_pauses_and_resumes_reading(connect: Callable[..., Any]) -> None:
    conn = await connect()
    conn.feed(texts(*[APPEND] * 70))  # over READ_AHEAD_MESSAGES
    assert conn.transport.paused
    for _ in range(70):
        await conn.protocol.receive()
    assert not conn.transport.paused and conn.protocol._queued_bytes == 0


# ---- a real uvicorn server on a real socket ------------------------------------------------------------------


async def _echo(ws: WebSocket) -> None:
    await ws.accept()
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await ws.send_text(message["text"])
        else:
            await ws.send_bytes(message["bytes"])


@pytest.fixture(params=list(PROTOCOLS))
async def echo_server(request: pytest.FixtureRequest) -> AsyncIterator[uvicorn.Server]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = Starlette(routes=[WebSocketRoute("/ws", _echo)])
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="critical", ws=PROTOCOLS[request.param],
                                           ws_max_size=MAX_SIZE, ws_per_message_deflate=False))
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    yield server
    server.should_exit = True
    await task


@pytest.fixture
def echo_url(echo_server: uvicorn.Server) -> str:
    return f"ws://127.0.0.1:{echo_server.config.port}/ws"


async def test_websockets_client_conversation(echo_server: uvicorn.Server, echo_url: str) -> None:
    async with websockets.connect(echo_url, compression=None, max_size=None) as ws:
        for i in range(200):
            await ws.send(APPEND[:-1] + f", \"i\": {i}}}")
            if i == 100:
                pong = await ws.ping(b"mid")
        for i in range(200):
            assert json.loads(await ws.recv())["i"] == i
        await ws.send("one more")  # the read after a burst that may have ended mid-frame in websockets' buffer
        assert await ws.recv() == "one more"
        (protocol,) = [p for p in echo_server.server_state.connections
                       if isinstance(p, ReadAheadWebSocketProtocol)]
        assert protocol._at_boundary == protocol.fast_frames  # the fast path is in use on a real socket
        await asyncio.wait_for(pong, 5)
        await ws.send(["ab", "cd", "ef"])  # fragmented
        assert await ws.recv() == "abcdef"
        await ws.send(b"\x00bin")
        assert await ws.recv() == b"\x00bin"
        await ws.send("é" * (MAX_SIZE // 2))  # 64-bit length
        assert await ws.recv() == "é" * (MAX_SIZE // 2)
    assert ws.close_code == 1000


class RawClient:
    """A client writing frames by hand, a piece per TCP segment, and reading the server's frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = Protocol(Side.CLIENT, state=State.OPEN, max_size=None)

    @classmethod
    async def connect(cls, url: str) -> RawClient:
        host, port = url.removeprefix("ws://").split("/")[0].split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.write(HANDSHAKE + b"\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        return cls(reader, writer)

    async def write(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.writer.write(piece)
            await self.writer.drain()
            await asyncio.sleep(0.001)  # the server's read ends here, mostly

    async def frames(self, count: int) -> list[Frame]:
        out: list[Frame] = []
        while len(out) < count:
            data = await asyncio.wait_for(self.reader.read(1 << 16), 5)
            if not data:
                break
            self.parser.receive_data(data)
            out += [e for e in self.parser.events_received() if isinstance(e, Frame)]
        return out

    def close(self) -> None:
        self.writer.close()


async def test_real_socket_frames_split_across_reads(echo_url: str) -> None:
    client = await RawClient.connect(echo_url)
    stream = texts(*TEXTS) + frame(b"ping", Opcode.PING) + texts(APPEND, "last")
    rng = random.Random(14)
    cuts = sorted(rng.sample(range(1, len(stream)), 40))
    await client.write(*(stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)))
    frames = await client.frames(len(TEXTS) + 3)
    assert [(f.opcode, f.data) for f in frames] == (
        [(Opcode.TEXT, t.encode()) for t in TEXTS] + [(Opcode.PONG, b"ping")]
        + [(Opcode.TEXT, APPEND.encode()), (Opcode.TEXT, b"last")])
    await client.write(close_frame(1000))
    frames = await client.frames(1)
    assert close_code(frames) == 1000
    client.close()


@pytest.mark.parametrize("bad, code", [(frame(b"\xc3("), 1007), (frame("x" * (MAX_SIZE + 1)), 1009),
                                       (frame("hi", mask=False), 1002)])
async def test_real_socket_errors_close_the_connection(echo_url: str, bad: bytes, code: int) -> None:
    client = await RawClient.connect(echo_url)
    # (the too big frame's header only: the server closes on its length, and unread bytes would reset the socket)
    await client.write(texts("fine"), bad[:3], bad[3:64])
    frames = await client.frames(2)
    assert frames[0].data == b"fine" and close_code(frames) == code
    assert await asyncio.wait_for(client.reader.read(), 5) == b""  # the server closed the socket
    client.close()


# ---- the text consumer (switch "direct"): messages taken in the transport's callback ------------------------


@pytest.mark.parametrize("cls", list(PROTOCOLS.values()), ids=list(PROTOCOLS))
async def test_a_consumer_takes_texts_only_while_nothing_is_queued(connect: Callable[..., Any], cls) -> None:
    """The consumer sees a text only when the queue is empty, so messages reach the application in the order
    sent: once it declines one (or a binary message is queued), every later message queues behind it."""
    conn = await connect(cls)
    extension = conn.protocol.scope["extensions"]["vita.text_consumer"]
    taken: list[str] = []
    offered: list[str] = []

    def consumer(text: str) -> bool:
        offered.append(text)
        if text.startswith("take"):
            taken.append(text)
            return True
        return False

    extension["register"](consumer)
    conn.feed(texts("take 1", "take 2"), texts("keep 3", "take 4"), frame(b"\x00", Opcode.BINARY), texts("take 5"))
    assert taken == ["take 1", "take 2"]
    assert offered == ["take 1", "take 2", "keep 3"]  # "take 4" came with "keep 3" queued: not offered
    assert [m.get("text", m.get("bytes")) for m in conn.messages()] == ["keep 3", "take 4", b"\x00", "take 5"]
    conn.feed(texts("take 6"))  # the queue is empty again
    assert taken[-1] == "take 6" and conn.messages() == []
    extension["register"](None)
    conn.feed(texts("take 7"))
    assert taken[-1] == "take 6" and [m["text"] for m in conn.messages()] == ["take 7"]


async def test_a_closed_connection_is_freed_by_reference_counting(echo_server: uvicorn.Server, echo_url: str) -> None:
    """Once the client has gone, nothing keeps the protocol: not the text-consumer extension in its scope (a
    bound method of itself), not a consumer registered through it, not the timer that aborts a socket whose
    client stopped reading. A cycle there would keep each closed connection, its buffers and its transport,
    until the interpreter's next full collection: the cyclic collector is off for this test."""
    gc.disable()
    try:
        async with websockets.connect(echo_url, compression=None) as ws:
            await ws.send(APPEND)
            assert await ws.recv() == APPEND
            (protocol,) = [p for p in echo_server.server_state.connections
                           if isinstance(p, ReadAheadWebSocketProtocol)]
            protocol.scope["extensions"]["vita.text_consumer"]["register"](lambda text: False)
            freed = weakref.ref(protocol)
            del protocol
        for _ in range(200):
            if freed() is None:
                break
            await asyncio.sleep(0.01)
        assert freed() is None, f"the closed connection is kept by {[type(r).__name__ for r in gc.get_referrers(freed())]}"
    finally:
        gc.enable()
