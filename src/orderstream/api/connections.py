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


class ConnectionGuard:
    """What the connections of one server share: the cap, the header timeout, and
    the connections now waiting for a request head, longest-waiting first."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.cap = connection_cap(limits)
        self.header_timeout = limits.header_timeout
        self.waiting: dict[GuardedHttpToolsProtocol, None] = {}  # insertion order = waiting since
        self.evicted = 0

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
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()
        self.guard.make_room(self, len(self.connections))

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        next_request_queued = bool(self.pipeline)  # uvicorn starts it now
        super().on_response_complete()
        if not next_request_queued and not self.transport.is_closing():
            self._await_head()  # the next request's head, on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def close_idle(self) -> None:
        """Close this connection, which has no request in progress."""
        self._stop_waiting()
        if not self.transport.is_closing():
            self.transport.close()

    def _await_head(self) -> None:
        self._stop_waiting()
        self.guard.waiting[self] = None
        self._head_timer = self.loop.call_later(self.guard.header_timeout, self.close_idle)

    def _stop_waiting(self) -> None:
        self.guard.waiting.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
