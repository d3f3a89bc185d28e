"""Connections that hold the server without sending a request, or without reading
its answer: closed, never waited on.

uvicorn closes a kept-alive connection that stays silent for ``timeout_keep_alive``,
but nothing else: a connection that never sends a byte, or sends its request head
a byte at a time, or never reads what it asked for, stays open for as long as the
client likes, and enough of them use up the process's file descriptors (or the
connection cap), after which even ``/health`` cannot be accepted.
:class:`GuardedHttpToolsProtocol` is uvicorn's httptools protocol with the guards
it lacks:

- **Header timeout**: a connection must complete a request head within
  ``header_timeout`` seconds of opening (or of its previous answer); else it is
  closed. Trickling bytes does not extend it.
- **Head size**: a request head (request line and header lines, counted as the
  bytes arrive) over ``max_head_bytes``, or with more than :data:`MAX_HEADERS` header
  lines, gets ``431`` and the connection is closed. httptools has no limit of its
  own: a 20 MB head was parsed, answered 200, and stalled the event loop for
  seconds, and an unfinished one held its bytes until the header timeout.
- **Send timeout**: bytes the server has written but the kernel would not take
  (the client does not read, so its receive window is shut) may wait
  ``send_timeout`` seconds; then the connection is aborted (a plain close would
  wait for them forever). uvicorn's flow control otherwise parks the request on
  ``drain()`` for good, beyond every other timeout: 80 clients with a 2 KiB
  receive buffer, each sending 40 pipelined ``GET /schema/openapi.json`` and
  reading nothing, held a cap of 64 until they let go (hostile run). The write
  buffer's high-water mark is 0, so "paused for writing" means "holds unsent
  bytes": the tail of a finished answer, on a connection being closed, counts too.
- **Connection cap**: past ``max_connections`` open connections, a new one makes
  room by closing the connection that has waited longest for a request head (it
  costs the server nothing to drop, and a slow or idle client is the likeliest
  to be holding many), else by aborting the one whose unsent bytes have waited
  longest for its client to read; if every connection is busy with a request that
  is still moving, the new one is closed instead. The default cap stays below the
  file-descriptor limit, so the listening socket can always accept (an ``accept``
  that fails with ``EMFILE`` makes the event loop stop accepting for a second at
  a time).

The body timeout is the application's (:func:`orderstream.api.plumbing.strict_body`:
408 and the connection closed), so it holds whatever server runs the app.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import struct
from typing import TYPE_CHECKING

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from orderstream.api.problems import PROBLEM_JSON, bare_problem
from orderstream.config import ConnectionLimits

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application

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
    """What the connections of one server share: the cap, the timeouts, the
    connections now waiting for a request head and those whose unsent bytes wait
    for their client, each with the time it started to.

    One sweep every :data:`SWEEP_INTERVAL` closes those past their timeout:
    cheaper than a timer per request (a request only moves its connection out of
    and back into an ordered dict), and a timeout is a bound, not an appointment."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.cap = connection_cap(limits)
        self.header_timeout = limits.header_timeout
        self.send_timeout = limits.send_timeout
        self.max_head_bytes = limits.max_head_bytes
        self.waiting: dict[GuardedHttpToolsProtocol, float] = {}
        """Connection -> loop time it began waiting; insertion order is that order."""
        self.stalled: dict[GuardedHttpToolsProtocol, float] = {}
        """Connection -> loop time its unsent bytes began waiting for the client to
        read (its transport paused writing); insertion order is that order."""
        self.evicted = 0
        self.send_timeouts = 0
        self._sweeping: asyncio.TimerHandle | None = None

    def wait_for_head(self, connection: GuardedHttpToolsProtocol, loop: asyncio.AbstractEventLoop) -> None:
        self.waiting.pop(connection, None)
        self.waiting[connection] = loop.time()
        self._sweep_soon(loop)

    def stall(self, connection: GuardedHttpToolsProtocol, loop: asyncio.AbstractEventLoop) -> None:
        self.stalled.pop(connection, None)
        self.stalled[connection] = loop.time()
        self._sweep_soon(loop)

    def _sweep_soon(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sweeping is None:
            self._sweeping = loop.call_later(SWEEP_INTERVAL, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close every connection that has waited past the header timeout, and abort
        every one whose unsent bytes have waited past the send timeout (the oldest
        come first: stop at the first that has not)."""
        deadline = loop.time() - self.header_timeout
        for connection, since in list(self.waiting.items()):
            if since > deadline:
                break
            connection.close_idle()
        deadline = loop.time() - self.send_timeout
        for connection, since in list(self.stalled.items()):
            if since > deadline:
                break
            self.send_timeouts += 1
            if self.send_timeouts == 1 or self.send_timeouts % 1000 == 0:
                log.warning(
                    "aborted a connection whose client left its answer unread for %g s "
                    "(ORDERSTREAM_SEND_TIMEOUT); %d so far",
                    self.send_timeout,
                    self.send_timeouts,
                )
            connection.abort_stalled()
        self._sweeping = None
        if self.waiting or self.stalled:
            self._sweep_soon(loop)

    def make_room(self, newcomer: GuardedHttpToolsProtocol, open_connections: int) -> None:
        """Past the cap, close the connection that has waited longest for a request
        head, else abort the one whose unsent bytes have waited longest for their
        client (the newcomer itself when there is neither)."""
        if open_connections <= self.cap:
            return
        idle = next((c for c in self.waiting if c is not newcomer), None)
        stalled = next(iter(self.stalled), None)
        self.evicted += 1
        if self.evicted == 1 or self.evicted % 1000 == 0:
            log.warning(
                "%d connections open, over the cap of %d (ORDERSTREAM_MAX_CONNECTIONS); closed %d so far",
                open_connections,
                self.cap,
                self.evicted,
            )
        if idle is not None:
            idle.close_idle()
        elif stalled is not None:
            stalled.abort_stalled()
        else:
            newcomer.close_idle()


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """The protocol class to give uvicorn (``Config(http=...)``): one per server,
    since its connections share one :class:`ConnectionGuard`."""
    guard = ConnectionGuard(limits)

    class Protocol(GuardedHttpToolsProtocol):
        pass

    Protocol.guard = guard
    return Protocol


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header timeout, a send timeout and a
    connection cap (see the module docstring). Only connection and flow-control
    events are overridden (and the start of a request, to know which one is being
    answered); parsing and the request cycle are uvicorn's."""

    guard: ConnectionGuard
    head_bytes: int | None = 0
    """Bytes received since the current request head began (``None``: it is complete)."""
    header_lines = 0
    head_refused = False
    running: RequestResponseCycle | None = None
    """The request whose answer is being sent (pipelined ones queue behind it)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=0)  # paused for writing = holds unsent bytes
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

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self.running = cycle
        super()._start_asgi_task(cycle, app)

    def pause_writing(self) -> None:
        super().pause_writing()
        self.guard.stall(self, self.loop)

    def resume_writing(self) -> None:
        self.guard.stalled.pop(self, None)
        super().resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.waiting.pop(self, None)
        self.guard.stalled.pop(self, None)
        # uvicorn tells only the newest request's cycle that the client is gone. With
        # requests pipelined behind it, the one being answered then wrote to the closed
        # transport: an ERROR "Exception in ASGI application" per connection, for a
        # client that merely left.
        if self.running is not None and not self.running.response_complete:
            self.running.disconnected = True
        super().connection_lost(exc)

    def close_idle(self) -> None:
        """Close this connection, which has no request in progress."""
        self.guard.waiting.pop(self, None)
        if not self.transport.is_closing():
            self.transport.close()

    def abort_stalled(self) -> None:
        """Abort this connection, whose client does not read what it was sent (closing
        would wait for it to): a reset, and the unsent bytes dropped. Without the zero
        linger the kernel would keep them (megabytes) behind its FIN for minutes, and
        the client would never learn the connection is gone."""
        self.guard.stalled.pop(self, None)
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()


class HeadTooLarge(Exception):
    """Raised inside the parser's header callback to stop parsing a head with too many
    header lines (:meth:`GuardedHttpToolsProtocol.on_header`)."""
