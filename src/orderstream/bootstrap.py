"""The composition root: the one place that builds real clients and wires them.

Nothing is built at import time. ``await build(settings)`` opens the stores
chosen by URL and returns a :class:`Container`; ``await container.close()``
closes them (the event store writes every acknowledged append first).

Extension hook (sagas). ``container.background_services`` is a list of
:class:`BackgroundService` (anything with ``name`` and ``async run(stop)``)
that ``orderstream serve`` runs beside the API and the projection runners and
stops on shutdown. ``orderstream serve`` and ``orderstream worker`` fill it
from ``orderstream.sagas.fulfilment.saga.background_services(container)`` when that module
exists (see :func:`saga_services`); ``container.extensions`` holds objects such
hooks want to share with route handlers (e.g. a Temporal client under
``"temporal_client"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from orderstream.application.commands import CommandHandler
from orderstream.application.errors import StorageFull
from orderstream.application.projection_runner import ProjectionRunner
from orderstream.application.queries import Queries
from orderstream.application.snapshots import SnapshotStore
from orderstream.application.use_cases import UseCases
from orderstream.config import ConfigError, Settings, scheme_of, sqlite_path
from orderstream.events import EventRegistry
from orderstream.events import registry as default_registry
from orderstream.eventstore.base import EventStore
from orderstream.metrics import MeteredCommandHandler, Metrics
from orderstream.readstore.base import ReadStore
from projections.base import Projection

log = logging.getLogger("orderstream")

SAGA_HOOK_MODULE = "orderstream.sagas.fulfilment.saga"
SAGA_HOOK_FUNCTION = "background_services"


class BackgroundService(Protocol):
    """A long-running part of the process: runs until ``stop`` is set, then returns."""

    @property
    def name(self) -> str: ...

    async def run(self, stop: asyncio.Event) -> None: ...


@dataclass
class FunctionService:
    """Adapts ``async def fn(stop)`` to :class:`BackgroundService`."""

    name: str
    fn: Callable[[asyncio.Event], Awaitable[None]]

    async def run(self, stop: asyncio.Event) -> None:
        await self.fn(stop)


# ------------------------------------------------------------------------- backends


async def open_event_store(url: str) -> EventStore:
    """``sqlite:///path`` (embedded) or ``kurrentdb://`` / ``esdb://`` (server)."""
    scheme = scheme_of(url)
    if scheme == "sqlite":
        from orderstream.eventstore.sqlite import SqliteEventStore

        return await SqliteEventStore.open(sqlite_path(url))
    if scheme in ("kurrentdb", "esdb", "esdb+discover", "kurrentdb+discover"):
        from orderstream.eventstore.kurrentdb import KurrentDBEventStore

        return await KurrentDBEventStore.open(url)
    raise ConfigError(f"unsupported event store URL: {url!r}")


async def open_read_store(url: str) -> ReadStore:
    """``sqlite:///path`` (embedded) or ``http(s)://host:9200`` (Elasticsearch; an
    optional ``?prefix=name-`` query parameter sets the index prefix)."""
    scheme = scheme_of(url)
    if scheme == "sqlite":
        from orderstream.readstore.sqlite import SqliteReadStore

        return await SqliteReadStore.open(sqlite_path(url))
    if scheme in ("http", "https"):
        from orderstream.readstore.elasticsearch import ElasticsearchReadStore

        parts = urlsplit(url)
        params = parse_qs(parts.query)
        prefix = params.pop("prefix", [None])[0]
        clean = urlunsplit(parts._replace(query=urlencode(params, doseq=True)))
        if prefix is not None:
            return await ElasticsearchReadStore.open(clean, prefix=prefix)
        return await ElasticsearchReadStore.open(clean)
    raise ConfigError(f"unsupported read store URL: {url!r}")


# ------------------------------------------------------------------------- container


@dataclass(eq=False)
class Container:
    settings: Settings
    event_store: EventStore
    read_store: ReadStore
    registry: EventRegistry
    metrics: Metrics
    handler: MeteredCommandHandler
    use_cases: UseCases
    queries: Queries
    runners: dict[str, ProjectionRunner]
    """Projection runners by collection name. Built always (queries use them to
    wait for positions, across processes too); run only where asked."""
    background_services: list[BackgroundService] = field(default_factory=list)
    """Extra services ``serve`` runs beside the API and the runners (the saga hook)."""
    extensions: dict[str, Any] = field(default_factory=dict)
    _closed: bool = False

    @property
    def projection_services(self) -> list[BackgroundService]:
        return [FunctionService(f"projection:{name}", r.run) for name, r in self.runners.items()]

    async def close(self) -> None:
        """Wait for the command handler's snapshot writes, close the read store, then
        the event store (which flushes pending appends)."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.handler.close()
        finally:
            try:
                await self.read_store.close()
            finally:
                await self.event_store.close()


async def build(
    settings: Settings,
    *,
    projections: tuple[Projection, ...] | None = None,
    registry: EventRegistry = default_registry,
) -> Container:
    """Open the stores and wire everything. The caller owns ``container.close()``."""
    if projections is None:
        from projections.registry import ALL_PROJECTIONS

        projections = ALL_PROJECTIONS
    event_store = await open_event_store(settings.event_store_url)
    try:
        read_store = await open_read_store(settings.read_store_url)
    except BaseException:
        await event_store.close()
        raise
    metrics = Metrics()
    snapshots = SnapshotStore(event_store, every=settings.snapshot_every)
    metrics.watch(event_store, snapshots)
    handler = MeteredCommandHandler(
        CommandHandler(event_store, registry, on_conflict=metrics.conflict_retried, snapshots=snapshots),
        metrics,
    )
    runners = {
        p.schema.name: ProjectionRunner(event_store, read_store, p, registry=registry) for p in projections
    }
    queries = Queries(
        event_store=event_store,
        read_store=read_store,
        handler=handler,
        trackers=runners,
        consistency_timeout=settings.consistency_timeout,
    )
    return Container(
        settings=settings,
        event_store=event_store,
        read_store=read_store,
        registry=registry,
        metrics=metrics,
        handler=handler,
        use_cases=UseCases(handler),
        queries=queries,
        runners=runners,
    )


def _saga_module() -> Any:
    """``orderstream.sagas.fulfilment.saga`` if it exists. A module that exists but fails to import
    is an error, not a silent skip."""
    if importlib.util.find_spec(SAGA_HOOK_MODULE.split(".")[0]) is None:
        return None
    if importlib.util.find_spec(SAGA_HOOK_MODULE) is None:
        return None
    return importlib.import_module(SAGA_HOOK_MODULE)


async def saga_services(container: Container) -> list[BackgroundService]:
    """The saga hook: ``orderstream.sagas.fulfilment.saga.background_services(container)`` (async,
    returning a list of :class:`BackgroundService`), if that module exists."""
    hook = getattr(_saga_module(), SAGA_HOOK_FUNCTION, None)
    if hook is None:
        return []
    services: list[BackgroundService] = list(await hook(container))
    return services


async def attach_api_extensions(container: Container) -> None:
    """For a process that serves the API without running the sagas:
    ``orderstream.sagas.fulfilment.saga.attach_fulfilment_client(container)`` (connects to
    ``TEMPORAL_ADDRESS`` if set). Failing to connect is logged, not fatal: the
    fulfilment route answers 503 until then."""
    attach = getattr(_saga_module(), "attach_fulfilment_client", None)
    if attach is None:
        return
    try:
        await attach(container)
    except Exception as exc:
        log.warning("sagas unavailable to the API (%s): GET /orders/{id}/fulfilment answers 503", exc)


STORAGE_FULL_RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds before restarting a service stopped by a full disk (the last one repeats)."""


async def run_services(services: list[BackgroundService], stop: asyncio.Event) -> None:
    """Run every service until ``stop`` is set; a service that crashes is logged
    and sets ``stop`` (the process shuts down rather than limp on without it).

    Except on a full disk (:class:`~orderstream.application.errors.StorageFull`):
    that stops every writer alike and passes when space is freed, so the service
    is restarted after a growing delay while the API goes on answering reads (and
    507 to writes)."""

    async def guarded(service: BackgroundService) -> None:
        restarts = 0
        while not stop.is_set():
            try:
                await service.run(stop)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not _storage_full(exc):
                    log.exception("%s failed; shutting down", service.name)
                    stop.set()
                    return
                delay = STORAGE_FULL_RESTART_DELAYS[min(restarts, len(STORAGE_FULL_RESTART_DELAYS) - 1)]
                restarts += 1
                log.warning(
                    "%s paused: the disk is full (%s); restarting in %.0f s", service.name, exc, delay
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)

    tasks = [asyncio.create_task(guarded(s), name=s.name) for s in services]
    try:
        await stop.wait()
    finally:
        stop.set()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                log.warning("%s did not stop in time; cancelling", task.get_name())
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def _storage_full(exc: BaseException) -> bool:
    """A :class:`StorageFull`, or a group of errors (a service's task group) that
    are all one."""
    if isinstance(exc, BaseExceptionGroup):
        _full, rest = exc.split(StorageFull)
        return rest is None
    return isinstance(exc, StorageFull)


CHILD_RESTART_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Seconds before starting again a child process that exited on its own; the delay
grows while it keeps exiting within :data:`CHILD_STABLE_AFTER` of its start (the
last one repeats) and starts over after it ran longer."""
CHILD_STABLE_AFTER = 30.0


async def run_child_process(
    name: str,
    argv: Sequence[str],
    stop: asyncio.Event,
    *,
    env: Mapping[str, str] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> None:
    """Run ``argv`` as a child process until ``stop`` is set, then send it SIGTERM and
    wait while it drains (its own graceful shutdown). The body of every
    worker-process service (API workers, saga workers).

    A child that exits on its own (a crash, a store it cannot open on a full disk,
    a kill) is logged and started again after a delay (:data:`CHILD_RESTART_DELAYS`):
    the process set goes on without it meanwhile rather than exit with it.
    ``on_line`` gets each line the child prints (its stdout is piped then)."""
    quick_exits = 0
    while not stop.is_set():
        started = time.monotonic()
        code = await _run_child_once(name, argv, stop, env=env, on_line=on_line)
        if stop.is_set():
            return
        quick_exits = quick_exits + 1 if time.monotonic() - started < CHILD_STABLE_AFTER else 1
        delay = CHILD_RESTART_DELAYS[min(quick_exits, len(CHILD_RESTART_DELAYS)) - 1]
        log.error("%s exited with status %s; starting it again in %.1f s", name, code, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)


async def _run_child_once(
    name: str,
    argv: Sequence[str],
    stop: asyncio.Event,
    *,
    env: Mapping[str, str] | None,
    on_line: Callable[[str], None] | None,
) -> int:
    """Until the child exits (after SIGTERM once ``stop`` is set); its status."""
    stdout = asyncio.subprocess.PIPE if on_line is not None else None
    process = await asyncio.create_subprocess_exec(*argv, env=env, stdout=stdout)
    relay = None
    if on_line is not None:
        relay = asyncio.create_task(_relay_lines(process, on_line), name=f"{name}-output")
    exited = asyncio.ensure_future(process.wait())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        return await exited
    finally:
        stopping.cancel()
        if process.returncode is None:  # cancelled while draining
            process.kill()
        if relay is not None:
            await relay


async def _relay_lines(process: asyncio.subprocess.Process, on_line: Callable[[str], None]) -> None:
    assert process.stdout is not None
    async for raw in process.stdout:
        on_line(raw.decode(errors="replace").rstrip())


def describe(container: Container) -> Mapping[str, Any]:
    return {**container.settings.describe(), "projections": sorted(container.runners)}
