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
"""

from __future__ import annotations

from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

# What a session may have received and not yet processed before its socket stops being read: a second of
# 20 ms events, or one large event (a message is queued whole: ws_max_size bounds a single one).
READ_AHEAD_BYTES = 256 << 10
READ_AHEAD_MESSAGES = 64


class ReadAheadWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol that pauses reading only when the application falls behind."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queued_bytes = 0  # size of the received messages waiting in self.queue

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
            self.queue.put_nowait({"type": "websocket.receive", "text": text})
        else:
            self.queue.put_nowait({"type": "websocket.receive", "bytes": data})
        self._queued_bytes += len(data)
        if not self.read_paused and (self._queued_bytes > READ_AHEAD_BYTES
                                     or self.queue.qsize() > READ_AHEAD_MESSAGES):
            self.read_paused = True
            self.transport.pause_reading()

    async def run_asgi(self) -> None:
        await super().run_asgi()
        # The application is done with the connection and uvicorn has closed the transport, which still
        # flushes what is buffered first: a client that stopped reading would hold the socket (and the
        # messages read ahead of it) for good. Abort it after the close timeout, as the legacy protocol does.
        self.loop.call_later(self.close_timeout, self._abort_if_open)

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
