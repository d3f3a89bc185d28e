"""The composition root: the one place that builds real clients and wires them.

Nothing is built at import time. ``await build(settings)`` opens the stores
chosen by URL, registers the fulfilment saga and returns a
:class:`~orderstream.container.Container`; ``await container.close()`` closes
them (the event store writes every acknowledged append first).

The saga is registered statically: this module imports
:mod:`orderstream.sagas.fulfilment` and hands a
:class:`~orderstream.sagas.fulfilment.saga.FulfilmentSaga` to the container,
whose routes the API serves and whose readiness ``/ready`` reports (the core knows
it only as :class:`~orderstream.container.Saga`). ``orderstream serve`` and
``orderstream worker`` (:mod:`orderstream.cli`, the other half of the composition
root) run its background services. A second saga would be registered here the
same way (docs/sagas.md).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

from orderstream.application.commands import CommandHandler
from orderstream.application.projection_runner import ProjectionRunner
from orderstream.application.queries import Queries
from orderstream.application.snapshots import SnapshotStore
from orderstream.application.use_cases import UseCases
from orderstream.config import ConfigError, Settings, scheme_of, sqlite_path
from orderstream.container import Container
from orderstream.events import EventRegistry
from orderstream.events import registry as default_registry
from orderstream.eventstore.base import EventStore
from orderstream.metrics import MeteredCommandHandler, Metrics
from orderstream.readstore.base import ReadStore
from orderstream.sagas.fulfilment.saga import FulfilmentSaga
from projections.base import Projection

log = logging.getLogger("orderstream")


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


async def open_read_store(url: str, *, read_timeout: float | None = None) -> ReadStore:
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
        options: dict[str, Any] = {} if read_timeout is None else {"read_timeout": read_timeout}
        if prefix is not None:
            options["prefix"] = prefix
        return await ElasticsearchReadStore.open(clean, **options)
    raise ConfigError(f"unsupported read store URL: {url!r}")


# ------------------------------------------------------------------------- wiring


async def build(
    settings: Settings,
    *,
    projections: tuple[Projection, ...] | None = None,
    registry: EventRegistry = default_registry,
    saga: FulfilmentSaga | None = None,
) -> Container:
    """Open the stores and wire everything. The caller owns ``container.close()``.

    ``saga``: the fulfilment saga, registered here whatever the process runs (its
    routes are served by every API; ``serve``/``worker`` also run its services).
    ``None``: one with the settings' defaults (the CLI passes one built from the
    environment)."""
    if projections is None:
        from projections.registry import ALL_PROJECTIONS

        projections = ALL_PROJECTIONS
    event_store = await open_event_store(settings.event_store_url)
    try:
        read_store = await open_read_store(settings.read_store_url, read_timeout=settings.read_timeout)
    except BaseException:
        await event_store.close()
        raise
    saga = saga or FulfilmentSaga()
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
        use_cases=UseCases(handler, vault=saga.gateway),
        queries=queries,
        runners=runners,
        saga=saga,
    )


def describe(container: Container) -> Mapping[str, Any]:
    return {**container.settings.describe(), "projections": sorted(container.runners)}
