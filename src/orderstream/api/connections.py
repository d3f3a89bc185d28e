"""Connections that hold the server without sending a request: closed, never waited on.

uvicorn closes a kept-alive connection that stays silent for ``timeout_keep_alive``,
but nothing else: a connection that never sends a byte, or sends its request head
a byte at a time, stays open for as long as the client likes, and enough of them
use up the process's file descriptors, after which even ``/health`` cannot be
accepted. :class:`GuardedHttpToolsProtocol` is uvicorn's httptools protocol with
the two guards it lacks:

- **Header timeout**: a connection must complete a request head within
  ``header_timeout`` seconds of opening (or of its previous answer); else it is
  closed. Trickling bytes does not extend it.
- **Head size**: a request head (request line and header lines, counted as the
  bytes arrive) over ``max_head_bytes``, or with more than :data:`MAX_HEADERS` header
  lines, gets ``431`` and the connection is closed. httptools has no limit of its
  own: a 20 MB head was parsed, answered 200, and stalled the event loop for
  seconds, and an unfinished one held its bytes until the header timeout.
- **Connection cap**: past ``max_connections`` open connections, a new one makes
  room by closing the connection that has waited longest for a request head (it
  costs the server nothing to drop, and a slow or idle client is the likeliest
  to be holding many); if every connection is busy with a request, the new one is
  closed instead. The default cap stays below the file-descriptor limit, so the
  listening socket can always accept (an ``accept`` that fails with ``EMFILE``
  makes the event loop stop accepting for a second at a time).

The body timeout is the application's (:func:`orderstream.api.plumbing.strict_body`:
408 and the connection closed), so it holds whatever server runs the app.
"""

from __future__ import annotations

import asyncio
import logging
import resource

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from orderstream.api.problems import PROBLEM_JSON, bare_problem
from orderstream.config import ConnectionLimits

log = logging.getLogger("orderstream.api.connections")

FD_RESERVE = 128
"""File descriptors kept for what is not a client connection: the SQLite files and
their WAL, the Elasticsearch and Temporal sockets, logs, the worker pipes."""


def connection_cap(limits: ConnectionLimits) -> int:
    """``limits.max_connections``, or when that is 0 (auto) the soft file-descriptor
    limit less :data:`FD_RESERVE` (at least 16)."""
    if limits.max_connections:
        return limits.max_connections
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65_536
    return max(16, soft - FD_RESERVE)


MAX_HEADERS = 100
"""Header lines in one request head; a browser sends about 20."""

LINGER_SECONDS = 2.0
"""How long a connection refused for its head still has its input read and dropped."""

SWEEP_INTERVAL = 0.5
"""Seconds between two looks for connections past the header timeout."""


class ConnectionGuard:
    """What the connections of one server share: the cap, the header timeout, and
    the connections now waiting for a request head with the time they started to.

    One sweep every :data:`SWEEP_INTERVAL` closes those past the header timeout:
    cheaper than a timer per request (a request only moves its connection out of
    and back into an ordered dict), and a timeout is a bound, not an appointment."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.cap = connection_cap(limits)
        self.header_timeout = limits.header_timeout
        self.max_head_bytes = limits.max_head_bytes
        self.waiting: dict[GuardedHttpToolsProtocol, float] = {}
        """Connection -> loop time it began waiting; insertion order is that order."""
        self.evicted = 0
        self._sweeping: asyncio.TimerHandle | None = None

    def wait_for_head(self, connection: GuardedHttpToolsProtocol, loop: asyncio.AbstractEventLoop) -> None:
        self.waiting.pop(connection, None)
        self.waiting[connection] = loop.time()
        if self._sweeping is None:
            self._sweeping = loop.call_later(SWEEP_INTERVAL, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close every connection that has waited past the header timeout (the oldest
        come first: stop at the first that has not)."""
        deadline = loop.time() - self.header_timeout
        for connection, since in list(self.waiting.items()):
            if since > deadline:
                break
            connection.close_idle()
        self._sweeping = loop.call_later(SWEEP_INTERVAL, self._sweep, loop) if self.waiting else None

    def make_room(self, newcomer: GuardedHttpToolsProtocol, open_connections: int) -> None:
        """Past the cap, close the connection that has waited longest for a request
        head (the newcomer itself when no other one is waiting)."""
        if open_connections <= self.cap:
            return
        victim = next((c for c in self.waiting if c is not newcomer), newcomer)
        self.evicted += 1
        if self.evicted == 1 or self.evicted % 1000 == 0:
            log.warning(
                "%d connections open, over the cap of %d (ORDERSTREAM_MAX_CONNECTIONS); closed %d so far",
                open_connections,
                self.cap,
                self.evicted,
            )
        victim.close_idle()


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn (``Config(http=...)``): one per server,
    since its connections share one :class:`ConnectionGuard`."""
    guard = ConnectionGuard(limits)

    class Protocol(GuardedHttpToolsProtocol):
        pass

    Protocol.guard = guard
    return Protocol


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout and a connection cap
    (see the module docstring). Only connection events are overridden; parsing
    and the request cycle are uvicorn's."""

    guard: ConnectionGuard
    head_bytes: int | None = 0
    """Bytes received since the current request head began (``None``: it is complete)."""
    header_lines = 0
    head_refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.guard.wait_for_head(self, self.loop)
        self.guard.make_room(self, len(self.connections))

    def data_received(self, data: bytes) -> None:
        if self.head_refused:
            return  # read and dropped until the linger ends (see refuse_head)
        if self.head_bytes is not None:
            self.head_bytes += len(data)
        super().data_received(data)
        # Still no whole head (a head completed in this read reset the count): over the
        # limit, it will not become a request worth parsing. One read is at most 256 KiB.
        if self.head_bytes is not None and self.head_bytes > self.guard.max_head_bytes:
            self.refuse_head()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_lines += 1
        if self.header_lines > MAX_HEADERS:
            raise HeadTooLarge  # stops the parser; uvicorn answers the parser error
        super().on_header(name, value)

    def send_400_response(self, msg: str) -> None:
        if self.header_lines > MAX_HEADERS:
            self.refuse_head()
        else:
            super().send_400_response(msg)

    def refuse_head(self) -> None:
        """431 with a problem body, then close. What the client still sends is read
        and dropped for :data:`LINGER_SECONDS`: closing a socket with unread bytes
        resets the connection, and the client would lose the answer."""
        self.guard.waiting.pop(self, None)
        if self.transport.is_closing() or self.head_refused:
            return
        self.head_refused = True
        detail = (
            f"The request head is over {self.guard.max_head_bytes} bytes "
            f"or {MAX_HEADERS} header lines (ORDERSTREAM_MAX_HEAD_BYTES)."
        )
        body = bare_problem(431, "head-too-large", detail)
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            + f"content-type: {PROBLEM_JSON}\r\ncontent-length: {len(body)}\r\n".encode()
            + b"connection: close\r\n\r\n"
            + body
        )
        self.head_bytes = None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def on_headers_complete(self) -> None:
        self.guard.waiting.pop(self, None)
        self.head_bytes, self.header_lines = None, 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.head_bytes = 0  # what follows on this connection is the next request's head
        super().on_message_complete()

    def on_response_complete(self) -> None:
        next_request_queued = bool(self.pipeline)  # uvicorn starts it now
        super().on_response_complete()
        if not next_request_queued and not self.transport.is_closing():
            self.guard.wait_for_head(self, self.loop)  # the next request's, on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.waiting.pop(self, None)
        super().connection_lost(exc)

    def close_idle(self) -> None:
        """Close this connection, which has no request in progress."""
        self.guard.waiting.pop(self, None)
        if not self.transport.is_closing():
            self.transport.close()


class HeadTooLarge(Exception):
    """Raised inside the parser's header callback to stop parsing a head with too many
    header lines (:meth:`GuardedHttpToolsProtocol.on_header`)."""
