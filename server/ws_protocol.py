"""The WebSocket protocol uvicorn runs for us: its sans-I/O one (websockets' `ServerProtocol` parsing frames
in `data_received`), reading ahead while the application keeps up (issue 14).

A realtime session receives fifty small events a second. uvicorn's legacy "websockets" protocol reads each
one through a chain of coroutines in a task of its own and hands it over with an `asyncio.wait`; its
sans-I/O protocol parses frames in the transport's callback and queues them for `receive()`, but pauses
the socket's reading after every message and resumes it when the application takes it: two epoll changes
per event. `ReadAheadWebSocketProtocol` pauses reading only while the messages waiting for the application
hold more than `READ_AHEAD_BYTES` (or number more than `READ_AHEAD_MESSAGES`), so a client that floods is
still held back by TCP, with a bounded queue, and one that keeps to real time costs no epoll change at all.

Sends have TCP backpressure in the sans-I/O protocol since uvicorn 0.52.1 (`send` waits while the transport
is paused for writing), so a client that stops reading still fills our per-session send queue and is closed;
its socket, which uvicorn would keep open while the unread bytes wait to be flushed, is aborted after the
close timeout, as uvicorn's legacy protocol does.
`hot_path_off = ["ws"]` runs uvicorn's legacy protocol instead (bench/load.py --compare).

Receiving a frame through websockets' sans-I/O parser (generator coroutines: `receive_data` -> `parse` ->
`Frame.parse` -> `read_exact`) and uvicorn's event dispatch costs several µs per event. Nearly every frame a
session receives is one small, complete, masked, unfragmented text frame, so `data_received` parses those
itself (`_fast_text_frames`) and queues their text as uvicorn would. A read holding anything else (a control,
binary or fragmented frame, reserved bits, a bad length, mask or UTF-8, a frame over the size limit) goes
whole to uvicorn's own `data_received`, with websockets' parser at the frame boundary where the read starts:
what the application and the peer see is then exactly what uvicorn does with that read, errors included
(uvicorn drops the valid messages of a read that ends in a protocol error: so do we). The fast path resumes
once websockets' parser is idle between frames again. `hot_path_off = ["wsframe"]` turns it off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import Protocol, State
from websockets.streams import StreamReader

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension: the same function in Python
    from websockets.utils import apply_mask

# What a session may have received and not yet processed before its socket stops being read: a second of
# 20 ms events, or one large event (a message is queued whole: ws_max_size bounds a single one).
READ_AHEAD_BYTES = 256 << 10
READ_AHEAD_MESSAGES = 64

# The ASGI scope extension through which the application may take text messages in the transport's callback
# (`ReadAheadWebSocketProtocol.set_text_consumer`): a realtime session handles its 20 ms appends there,
# without a queue, a task switch and the receive chain per event (issue 14).
TEXT_CONSUMER_EXTENSION = "vita.text_consumer"

# The first header byte of the one frame the fast path takes: FIN set, RSV1-3 clear (no extension is in use
# when it runs), opcode 1 (text). The second byte's top bit is MASK, which RFC 6455 requires from a client.
FIN_TEXT = 0x81
MASK_BIT = 0x80
LENGTH_BITS = 0x7F  # the rest of the second byte: the payload length, or one of these two
LENGTH_16 = 126  # 7-bit length values meaning "a 16-bit / 64-bit length follows" (RFC 6455 5.2)
LENGTH_64 = 127
MASK_SIZE = 4
# Above any 64-bit frame length: the limit when the connection has none (websockets' max_size=None).
NO_SIZE_LIMIT = 1 << 64

# websockets' parser is idle between two frames exactly when its frame loop waits in `at_eof` for more data.
_FRAME_LOOP = Protocol.parse.__code__
_WAIT_FOR_DATA = StreamReader.at_eof.__code__


def _between_frames(parser: Any) -> bool:
    """Whether websockets' parser generator is suspended in its frame loop waiting for the next frame's first
    byte (not mid-frame, in the handshake or discarding after a close), read from the `yield from` chain.
    An interpreter without `gi_yieldfrom` answers False: uvicorn's path, always."""
    outer, inner = None, parser
    while (nested := getattr(inner, "gi_yieldfrom", None)) is not None:
        outer, inner = inner, nested
    return (outer is not None and outer.gi_code is _FRAME_LOOP
            and getattr(inner, "gi_code", None) is _WAIT_FOR_DATA)


def _text_frame_size(buf: bytes | bytearray, pos: int, end: int, max_size: int) -> tuple[int, int] | None:
    """(payload start, payload end) of the FIN text frame at buf[pos:] as the fast path takes it;
    (0, 0) when more bytes are needed to tell; None when the frame is any other kind, or over max_size."""
    if buf[pos] != FIN_TEXT:
        return None
    if end - pos < 2:
        return 0, 0
    if not buf[pos + 1] & MASK_BIT:  # websockets fails it with 1002
        return None
    length = buf[pos + 1] & LENGTH_BITS
    start = pos + 2
    if length == LENGTH_16:  # a 20 ms append's (shifts: a third of int.from_bytes' cost)
        if end - start < 2:
            return 0, 0
        length = buf[start] << 8 | buf[start + 1]
        start += 2
    elif length == LENGTH_64:
        if end - start < 8:
            return 0, 0
        length = int.from_bytes(buf[start:start + 8], "big")
        start += 8
    if length > max_size:  # websockets fails it with 1009 as soon as it has read the length
        return None
    return start + MASK_SIZE, start + MASK_SIZE + length


class ReadAheadWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol that pauses reading only when the application falls behind,
    and parses the common text frame itself (`fast_frames`)."""

    fast_frames = True  # False: every byte goes through websockets' parser, as uvicorn does (hot_path_off)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queued_bytes = 0  # size of the received messages waiting in self.queue
        self._consumer: Callable[[str], bool] | None = None  # set_text_consumer
        # True while websockets' parser is idle between frames with nothing buffered, and the connection is
        # one the fast path may serve: the bytes since then are ours to parse (what is left of them is
        # self._partial, a frame's beginning), and uvicorn's path gets them all from that boundary.
        self._at_boundary = False
        self._partial = bytearray()
        self._partial_needs = 0  # the partial frame's total size once its header is known: wait until then
        self._max_size = NO_SIZE_LIMIT
        self._abort_timer: asyncio.TimerHandle | None = None  # run_asgi's, for a client that stopped reading

    def data_received(self, data: bytes) -> None:
        if (self._at_boundary or self._find_boundary()) and self.conn.state is State.OPEN and not self.close_sent:
            if self._partial:
                self._partial += data
                if len(self._partial) < self._partial_needs:
                    return
                data, self._partial = self._partial, bytearray()
            texts = self._fast_text_frames(data)
            if texts is not None:
                for text, size in texts:
                    self.curr_msg_data_type = "text"
                    self._receive_text(text, size)
                return
        elif self._partial:  # the connection closed or failed meanwhile: websockets gets it from the boundary
            data, self._partial = self._partial + data, bytearray()
        self._at_boundary = False
        super().data_received(data)

    def _find_boundary(self) -> bool:
        """Whether the fast path can take over now: the connection is open with no extension, no fragmented
        message and no frame logging (websockets logs each frame at DEBUG), and websockets' parser is idle
        between frames. Checked only after websockets had bytes to parse, so not once per fast event."""
        conn = self.conn
        if not (self.fast_frames and conn.state is State.OPEN and not conn.extensions and not conn.debug
                and conn.current_size is None and not conn.reader.buffer and conn.parser_exc is None
                and _between_frames(conn.parser)):
            return False
        limits = [size for size in (conn.max_message_size, conn.max_fragment_size) if size is not None]
        self._max_size = min(limits, default=NO_SIZE_LIMIT)
        self._at_boundary = True
        return True

    def _fast_text_frames(self, buf: bytes | bytearray) -> list[tuple[str, int]] | None:
        """The texts (and payload sizes) of the complete frames in buf, keeping a trailing partial one in
        self._partial; None, leaving buf for websockets, unless every frame in it is one the fast path takes.
        Nothing is queued before the whole read is known to be fast: uvicorn handles a read as one."""
        texts = []
        pos, end = 0, len(buf)
        while pos < end:
            span = _text_frame_size(buf, pos, end, self._max_size)
            if span is None:
                return None
            start, stop = span
            if stop == 0 or stop > end:  # the header or the payload is still on its way
                self._partial = bytearray(buf[pos:])
                self._partial_needs = stop - pos if stop else 0
                break
            try:
                text = apply_mask(buf[start:stop], buf[start - MASK_SIZE:start]).decode()
            except UnicodeDecodeError:  # uvicorn closes with 1007
                return None
            texts.append((text, stop - start))
            pos = stop
        return texts

    def send_receive_event_to_app(self) -> None:
        # uvicorn's method, but for when reading pauses.
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:  # past websocket.close: keep reading until the peer's close reply arrives
            return
        if self.curr_msg_data_type == "text":
            try:
                text = data.decode()
            except UnicodeDecodeError:
                self.logger.exception("Invalid UTF-8 sequence received from client.")
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
            self._receive_text(text, len(data))
        else:
            self._enqueue({"type": "websocket.receive", "bytes": data}, len(data))

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if self.response.status_code == 101:
            # Offered to the application through the ASGI scope (server/realtime.py takes it): see
            # `set_text_consumer`.
            self.scope["extensions"][TEXT_CONSUMER_EXTENSION] = {"register": self.set_text_consumer}

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._abort_timer is not None:
            self._abort_timer.cancel()
        # The scope's extension and the consumer refer back to this protocol (a bound method, a connection
        # holding the socket): cycles that would keep a closed connection for the next full collection.
        scope = getattr(self, "scope", None)  # set by the handshake, which the connection may not have reached
        if scope is not None:
            scope.get("extensions", {}).pop(TEXT_CONSUMER_EXTENSION, None)
        self._consumer = None

    def set_text_consumer(self, consumer: Callable[[str], bool] | None) -> None:
        """Hand text messages to `consumer` in the transport's callback instead of queueing them for
        `receive()`, whenever nothing is queued (so the order is kept): it returns True when it took the
        message, False to have it queued as usual. It must not raise, and must take a message only when the
        application is waiting in `receive()` with everything before it handled. None: queue everything."""
        self._consumer = consumer

    def _receive_text(self, text: str, size: int) -> None:
        """A received text message of `size` bytes: the consumer's if it takes it (then no ASGI message is built
        at all), else queued for the application."""
        consumer = self._consumer
        if consumer is not None and self.queue.empty() and consumer(text):
            return
        self._enqueue({"type": "websocket.receive", "text": text}, size)

    def _enqueue(self, message: Any, size: int) -> None:
        """Queue a message for the application, pausing reading past the limits."""
        self.queue.put_nowait(message)
        self._queued_bytes += size
        if not self.read_paused and (self._queued_bytes > READ_AHEAD_BYTES
                                     or self.queue.qsize() > READ_AHEAD_MESSAGES):
            self.read_paused = True
            self.transport.pause_reading()

    async def run_asgi(self) -> None:
        await super().run_asgi()
        # The application is done with the connection and uvicorn has closed the transport, which still
        # flushes what is buffered first: a client that stopped reading would hold the socket (and the
        # messages read ahead of it) for good. Abort it after the close timeout, as the legacy protocol does.
        if not self.disconnected:  # cancelled when the connection is lost (the timer holds this protocol)
            self._abort_timer = self.loop.call_later(self.close_timeout, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if not self.disconnected:
            self.transport.abort()

    async def receive(self) -> Any:
        message = await self.queue.get()
        if message["type"] == "websocket.receive":
            payload = message.get("text")
            # the byte count put in; a text's UTF-8 length only when it is not ASCII (rare, and one pass)
            self._queued_bytes -= len(message["bytes"]) if payload is None else (
                len(payload) if payload.isascii() else len(payload.encode()))
        if self.read_paused and self._queued_bytes <= READ_AHEAD_BYTES // 2 \
                and self.queue.qsize() <= READ_AHEAD_MESSAGES // 2:
            self.read_paused = False
            self.transport.resume_reading()
        return message


class ParsedByWebsocketsProtocol(ReadAheadWebSocketProtocol):
    """ReadAheadWebSocketProtocol with every frame parsed by websockets, as uvicorn does (hot_path_off =
    ["wsframe"]: benchmarks, bisecting)."""

    fast_frames = False
