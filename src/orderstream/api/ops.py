"""``/health``, ``/ready``, ``/metrics``: for load balancers, orchestrators and Prometheus."""

from __future__ import annotations

import asyncio
import logging

from litestar import Controller, Response, get
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from orderstream.api.schemas import (
    DevServerReadiness,
    Health,
    ProjectionReadiness,
    Readiness,
    SagaReadiness,
    TemporalReadiness,
)
from orderstream.application.group_status import state_of
from orderstream.bootstrap import Container
from orderstream.eventstore.base import SubscriptionGroupNotFound
from orderstream.sagas.fulfilment.client import FULFILMENT_CLIENT_KEY, FulfilmentClient
from orderstream.sagas.fulfilment.saga import TEMPORAL_LINK_KEY
from orderstream.sagas.fulfilment.trigger import GROUP as SAGA_GROUP
from orderstream.sagas.runtime import TemporalLink

log = logging.getLogger("orderstream.api")

PROBE_TIMEOUT = 2.0
AUTH_OFF_WARNING = "AUTHENTICATION IS OFF (ORDERSTREAM_AUTH=off): anyone may read and change everything."


async def refresh_projection_metrics(container: NamedDependency[Container]) -> dict[str, ProjectionReadiness]:
    """Ask every runner for its status; update the gauges on the way."""
    out: dict[str, ProjectionReadiness] = {}
    for name, runner in container.runners.items():
        try:
            st = await asyncio.wait_for(runner.status(), PROBE_TIMEOUT)
        except Exception as exc:
            log.warning("projection %s status failed: %s", name, exc)
            out[name] = ProjectionReadiness(error=type(exc).__name__)
            continue
        container.metrics.set_projection(
            name,
            st.checkpoint,
            st.lag_events,
            lag_seconds=st.lag_seconds,
            parked=st.parked,
            rebuilding=st.rebuilding,
        )
        progress = None
        if st.rebuilding and st.refill_until:
            progress = round(min(1.0, max(0, st.checkpoint or 0) / st.refill_until), 3)
        out[name] = ProjectionReadiness(
            version=st.version,
            checkpoint=st.checkpoint,
            head_position=st.head_position,
            lag_events=st.lag_events,
            lag_seconds=round(st.lag_seconds, 3),
            parked=st.parked,
            oldest_parked_position=st.oldest_parked_position,
            physical=st.physical,
            state=state_of(rebuilding=st.rebuilding, parked=st.parked, lag_events=st.lag_events),
            rebuild_progress=progress,
            refill_until=st.refill_until,
        )
    return out


async def temporal_readiness(container: Container) -> TemporalReadiness | None:
    """Whether this process reaches Temporal now (``None``: not configured for it)."""
    link = container.extensions.get(TEMPORAL_LINK_KEY)
    if not isinstance(link, TemporalLink):
        return None
    server = link.dev_server
    dev_server = None
    if server is not None:
        dev_server = DevServerReadiness(
            status=server.status,
            pid=server.pid,
            restarts=server.restarts,
            last_exit=server.last_exit,
            down_seconds=server.down_seconds,
        )
    if link.client is not None and await link.check(PROBE_TIMEOUT):
        return TemporalReadiness(status="connected", address=link.address, dev_server=dev_server)
    return TemporalReadiness(
        status="connecting" if link.client is None else "unreachable",
        address=link.address,
        attempts=link.attempts if link.client is None else None,
        last_error=link.last_error,
        unreachable_seconds=link.unreachable_seconds,
        dev_server=dev_server,
    )


async def refresh_saga_metrics(container: NamedDependency[Container]) -> SagaReadiness | None:
    """How far the sagas trail: the trigger group's status (any process sharing the
    event store can tell) and, where this process has a Temporal client, the count
    of running sagas, and whether Temporal is connected. ``None`` when no saga
    trigger ever ran against this store and no Temporal is configured. Updates
    the gauges on the way."""
    temporal = await temporal_readiness(container)
    try:
        info = await asyncio.wait_for(
            container.event_store.subscription_group_info(SAGA_GROUP), PROBE_TIMEOUT
        )
    except SubscriptionGroupNotFound:
        return None if temporal is None else SagaReadiness(temporal=temporal)
    except Exception as exc:
        log.warning("saga trigger status failed: %s", exc)
        return SagaReadiness(error=type(exc).__name__, temporal=temporal)
    running: int | None = None
    fulfilment = container.extensions.get(FULFILMENT_CLIENT_KEY)
    if isinstance(fulfilment, FulfilmentClient):
        try:
            running = await asyncio.wait_for(fulfilment.running_workflows(), PROBE_TIMEOUT)
        except Exception as exc:  # Temporal down: the lag in the store is still worth reporting
            log.warning("saga workflow count failed: %s", exc)
    container.metrics.set_saga(info.lag_events, info.in_flight, info.parked, running)
    oldest = None
    if info.parked:
        parked = await container.event_store.list_parked(SAGA_GROUP, limit=1000)
        oldest = min((p.event.position for p in parked), default=None)
    return SagaReadiness(
        trigger_lag_events=info.lag_events,
        in_flight=info.in_flight,
        parked=info.parked,
        oldest_parked_position=oldest,
        workflows_running=running,
        temporal=temporal,
    )


class OpsController(Controller):
    path = "/"
    tags = ["operations"]

    @get("/health", operation_id="health", summary="Liveness: the process answers")
    async def health(self) -> Health:
        return Health("ok")

    @get(
        "/ready",
        operation_id="ready",
        summary="Readiness: the stores answer; each projection's checkpoint and lag; the sagas' lag",
        description="200 when the event store and the read store answer, 503 otherwise. "
        "`status` is `rebuilding` (still 200) while a lost read model is filled again; each "
        "projection's `state`, parked events and, while rebuilding, `rebuild_progress` say more. "
        "The sagas' lag is reported, not judged.",
        responses={
            503: ResponseSpec(
                data_container=Readiness,
                description="A store does not answer (same body).",
                generate_examples=False,
            )
        },
    )
    async def ready(self, container: NamedDependency[Container]) -> Response[Readiness]:
        head: int | None = None
        event_store_ok = read_store_ok = True
        try:
            head = await asyncio.wait_for(container.event_store.head_position(), PROBE_TIMEOUT)
        except Exception as exc:
            log.warning("readiness: event store: %s", exc)
            event_store_ok = False
        try:
            for name in container.runners:
                await asyncio.wait_for(container.read_store.alias_target(name), PROBE_TIMEOUT)
        except Exception as exc:
            log.warning("readiness: read store: %s", exc)
            read_store_ok = False
        projections = await refresh_projection_metrics(container) if event_store_ok else {}
        sagas = await refresh_saga_metrics(container) if event_store_ok else None
        ok = event_store_ok and read_store_ok
        rebuilding = any(p.state == "rebuilding" for p in projections.values())
        body = Readiness(
            status=("rebuilding" if rebuilding else "ready") if ok else "unavailable",
            event_store="ok" if event_store_ok else "unavailable",
            read_store="ok" if read_store_ok else "unavailable",
            head_position=head,
            projections=projections,
            sagas=sagas,
            auth="on" if container.settings.auth_enabled else "off",
            warning=None if container.settings.auth_enabled else AUTH_OFF_WARNING,
        )
        return Response(body, status_code=HTTP_200_OK if ok else HTTP_503_SERVICE_UNAVAILABLE)

    @get(
        "/metrics",
        operation_id="metrics",
        summary="Prometheus metrics (text exposition format)",
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )
    async def metrics(self, container: NamedDependency[Container]) -> Response[bytes]:
        try:
            await refresh_projection_metrics(container)
            await refresh_saga_metrics(container)
        except Exception as exc:  # a scrape still answers with what it has
            log.warning("metrics: projection or saga status failed: %s", exc)
        body, content_type = container.metrics.render()
        return Response(body, media_type=content_type)
