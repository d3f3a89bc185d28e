"""A protocol-level STAND-IN for a KurrentDB server, for tests only (never shipped).

It is NOT KurrentDB: an in-memory gRPC server on 127.0.0.1 built on the server-side
stubs that ``kurrentdbclient`` ships, serving exactly the calls orderstream's adapter
makes, with the behaviour KurrentDB documents and kurrentdbclient's own tests assert.
A pass against it shows that the adapter and the real client work together over the
real protocol messages; it is not proof against a server. Tests that use it carry
the ``kurrentdb_standin`` marker; what it cannot prove is listed in docs/kurrentdb.md.

- :class:`StandIn` runs it on its own event loop in a background thread (in-process
  tests, whatever loop pytest-asyncio gives each test);
- ``python -m tests.kurrentdb_standin --port N`` runs it as a process (for tests whose
  service runs in subprocesses); it prints ``listening on 127.0.0.1:N`` when ready.
"""

from __future__ import annotations

import asyncio
import threading

import grpc.aio

from tests.kurrentdb_standin.server import serve


class StandIn:
    """The stand-in on a free port of 127.0.0.1, in a background thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kurrentdb-standin", daemon=True)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    @property
    def uri(self) -> str:
        return f"kurrentdb://127.0.0.1:{self.port}?tls=false"

    def start(self) -> StandIn:
        self._thread.start()
        self._server, self.port = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(timeout=30)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:  # the groups' pumps
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


__all__ = ["StandIn"]
