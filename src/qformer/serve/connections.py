"""The connections of ``qformer serve``: how long a client may take to send a request's headers,
and how many sockets may be open at once.

uvicorn bounds neither: a client that sends its headers a byte at a time holds its socket for as
long as it likes, and a few thousand such clients exhaust the server's file descriptors while
each costs its sender next to nothing. :class:`GuardedH11Protocol` is uvicorn's h11 protocol with
both limits: a connection whose headers are not complete within ``header_timeout_s`` is answered
408 and closed, and one that opens while ``max_connections`` are already open is answered 503
with ``Retry-After`` at once. (uvicorn's own ``limit_concurrency`` answers a plain-text 503 with
no ``Retry-After``, and only once the request's headers have arrived, which a slow client never
lets happen.) The body's pace is the app's to bound: :class:`~qformer.serve.middleware.BodyLimit`.
:func:`server_options` gives uvicorn these settings, for ``qformer serve`` and its tests alike.
"""

from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from qformer.serve.limits import RETRY_AFTER_S, Limits

logger = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, one instance per connection, with a deadline for each request's
    headers and a cap on open connections. :func:`guarded_protocol` makes the subclass that
    carries a server's two limits: uvicorn builds a protocol from its config alone."""

    header_timeout_s: float = Limits.header_timeout_s
    max_connections: int = Limits.max_connections

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timer: asyncio.TimerHandle | None = None
        self.refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[arg-type]
        # uvicorn's set holds every open connection of this server, this one included.
        if len(self.connections) > self.max_connections:
            self.refuse()
        else:
            self.watch_headers()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # a refused client may still be sending its request: read, and dropped
        super().data_received(data)
        self.watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_header_timer()
        super().connection_lost(exc)

    def watch_headers(self) -> None:
        """Run the header deadline while a request's headers are due: from the moment the
        connection opens, or the first byte of the next request on a kept-alive connection
        arrives (an idle kept-alive connection is uvicorn's ``timeout_keep_alive``), until h11
        has read the whole head. One deadline per request, not per byte: a client sending a
        byte a second gains nothing by it."""
        due = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not due:
            self.stop_header_timer()
        elif self.header_timer is None:
            self.header_timer = self.loop.call_later(self.header_timeout_s, self.headers_overdue)

    def stop_header_timer(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def headers_overdue(self) -> None:
        self.header_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        logger.warning("%s: no complete request headers within %g s; answered 408", self.peer(),
                       self.header_timeout_s)
        self.transport.write(self.error_response(
            408, f"the request's headers did not arrive within {self.header_timeout_s:g} s (header_timeout_s)"))
        self.transport.close()

    def refuse(self) -> None:
        """Answer 503 before the client has asked, then stop writing but keep reading until it
        closes (or ``header_timeout_s`` passes): closing a socket with unread input makes the
        kernel reset it, and a reset can reach the client before the 503 does, which it would
        then see as a failed connection instead of an answer to retry."""
        self.refused = True
        logger.warning("%s: %d connections open, over max_connections %d; answered 503", self.peer(),
                       len(self.connections), self.max_connections)
        self.transport.write(self.error_response(
            503, f"the server has {self.max_connections} connections open, its limit (max_connections); "
                 f"retry in {RETRY_AFTER_S} s", {"Retry-After": str(RETRY_AFTER_S)}))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(self.header_timeout_s, self.transport.close)

    def error_response(self, status: int, message: str, headers: dict[str, str] | None = None) -> bytes:
        """A whole HTTP/1.1 response, written past h11, which cannot answer a request it has not
        read: the app's one-line JSON error, and ``Connection: close``."""
        body = json.dumps({"error": message}).encode()
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        fields = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close",
                  **(headers or {})}
        head += [f"{name}: {value}".encode() for name, value in fields.items()]
        return b"\r\n".join(head) + b"\r\n\r\n" + body

    def peer(self) -> str:
        return "%s:%d" % self.client if self.client else "a client"


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """:class:`GuardedH11Protocol` with these limits, for ``uvicorn.Config(http=...)``."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout_s": header_timeout_s, "max_connections": max_connections})


def server_options(limits: Limits) -> dict[str, Any]:
    """The settings of ``uvicorn.run`` and ``uvicorn.Config`` that carry ``limits`` (shared by
    :func:`~qformer.serve.server.run_server` and the tests' server, so that both run the same):
    the guarded protocol, and the time the requests in flight get to finish at shutdown."""
    return {"http": guarded_protocol(limits.header_timeout_s, limits.max_connections),
            "timeout_graceful_shutdown": int(limits.request_timeout_s) + 5}
