"""``/health``, ``/ready``, ``/metrics``: for load balancers, orchestrators and Prometheus."""

from __future__ import annotations

import asyncio
import logging

from litestar import Controller, Response, get
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from orderstream.api.problems import problem_responses
from orderstream.api.schemas import Health, ProjectionReadiness, Readiness, SagaReadiness
from orderstream.application.group_status import state_of
from orderstream.container import Container

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


async def refresh_saga_metrics(container: NamedDependency[Container]) -> SagaReadiness | None:
    """The registered saga's readiness (``None`` without one); it updates its gauges."""
    if container.saga is None:
        return None
    return await container.saga.readiness(container, PROBE_TIMEOUT)


class OpsController(Controller):
    path = "/"
    tags = ["operations"]

    # 400 on every route: a header that must come once, sent twice (api/plumbing.py).
    @get(
        "/health",
        operation_id="health",
        summary="Liveness: the process answers",
        responses=problem_responses(400),
    )
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
            **problem_responses(400),
            503: ResponseSpec(
                data_container=Readiness,
                description="A store does not answer (same body).",
                generate_examples=False,
            ),
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
        responses=problem_responses(400),
    )
    async def metrics(self, container: NamedDependency[Container]) -> Response[bytes]:
        try:
            await refresh_projection_metrics(container)
            await refresh_saga_metrics(container)
        except Exception as exc:  # a scrape still answers with what it has
            log.warning("metrics: projection or saga status failed: %s", exc)
        body, content_type = container.metrics.render()
        return Response(body, media_type=content_type)
