"""Connection hygiene: a connection that never sends a complete request, or sends one too slowly, is closed.

uvicorn closes an idle kept-alive connection (`timeout_keep_alive`) but sets no deadline for the request
head itself, and none for the body: a TCP connection that sends nothing, or one header line now and then
(slowloris), stays open for good, holding a file descriptor and, for headers, memory. Here:

- `header_timeout_protocol(base)`: uvicorn's HTTP protocol with a deadline for the request head (WebSocket
  handshakes included) counted from the connection's opening or from the first byte of the next request on
  a kept-alive connection, and a cap on the head's size (httptools has none; h11 gets the same number).
- `BodyDeadlineMiddleware`: the whole body must arrive within `body_timeout_s` of its head; else 408 and the
  connection is closed.

The numbers are settings (`header_timeout_s`, `body_timeout_s`, `keep_alive_timeout_s`); the README's
"Connections" lines say why each default is what it is.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

# A request head (request line + headers) larger than this is refused. Our clients send a bearer key and a
# few short headers (< 2 KiB); browsers' cookies for another app on the same host could add some. nginx's
# default is 4 x 8 KiB buffers; 32 KiB matches it and bounds what a slow head can hold.
MAX_HEAD_BYTES = 32 << 10


def header_timeout_protocol(base: type[asyncio.Protocol], timeout_s: float) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's HTTP protocol `base` (httptools or h11) that closes a connection whose request
    head is not complete `timeout_s` after the connection opened (or after the first byte of a later request),
    or that grows past MAX_HEAD_BYTES."""

    class HeaderTimeoutProtocol(base):  # type: ignore[valid-type, misc]
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = 0

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            waiting = self._waiting_for_head()
            if waiting and self._head_timer is None:  # the first byte of the next request on a kept-alive one
                self._arm()
            super().data_received(data)
            if not waiting:
                return  # a request's body, or a pipelined request after it
            if self.transport.is_closing() or not self._waiting_for_head():
                self._disarm()  # the head is complete (or upgraded to a WebSocket, or refused)
                return
            self._head_bytes += len(data)  # still no complete head: every byte so far is head
            if self._head_bytes > MAX_HEAD_BYTES:
                log.debug("request head over %d bytes from %s: closing", MAX_HEAD_BYTES, self.client)
                self._close(b"431 Request Header Fields Too Large")

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # idle between requests: uvicorn's keep-alive timeout applies

        def _waiting_for_head(self) -> bool:
            # Upgraded to a WebSocket: this protocol is done with the connection.
            if self.transport is None or self.transport.get_protocol() is not self:
                return False
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(timeout_s, self._on_head_timeout)

        def _disarm(self) -> None:
            self._head_bytes = 0
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _on_head_timeout(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not self._waiting_for_head():
                return  # a request is being served (its body has BodyDeadlineMiddleware's deadline)
            log.debug("no complete request head from %s in %.0f s: closing", self.client, timeout_s)
            self._close(b"408 Request Timeout" if self._head_bytes else None)

        def _close(self, status: bytes | None) -> None:
            self._disarm()
            if status is not None:  # a client that sent something gets a reason; a silent one just a FIN
                self.transport.write(b"HTTP/1.1 " + status + b"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()

    HeaderTimeoutProtocol.__name__ = HeaderTimeoutProtocol.__qualname__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol


class BodyTimeoutError(Exception):
    """Raised into the app when the request body did not arrive in time (the middleware answers 408)."""


class BodyDeadlineMiddleware:
    """Plain ASGI: an HTTP request's body must be complete `timeout_s` after the app got the request.

    A late body makes the app's `receive` raise BodyTimeoutError; unless a response has started, the client
    gets 408 with `connection: close` (uvicorn then closes the connection). Only the body is timed: once it
    is complete, `receive` waits for the disconnect as long as the response runs (streams included)."""

    def __init__(self, app: Any, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_done = False
        started = False

        async def timed_receive() -> Any:
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyTimeoutError from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def watched_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, watched_send)
        except BodyTimeoutError:
            log.debug("request body to %s not complete in %.0f s: 408", scope.get("path"), self.timeout_s)
            if started:
                return
            body = (b'{"error":{"message":"the request body did not arrive within %d s","type":'
                    b'"invalid_request_error","param":null,"code":"request_timeout"}}' % int(self.timeout_s))
            await send({"type": "http.response.start", "status": 408, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})
