"""The fulfilment saga's worker: what polls its task queue (:func:`build_worker`,
:func:`run_worker`), and a standalone worker process.

    python -m orderstream.sagas.fulfilment.worker \\
        --temporal-address localhost:7233 --event-store sqlite:///data/events.db

It polls the task queue with the ``OrderFulfilment`` workflow and its
activities (over the given event store, with the sandbox payment gateway)
until SIGTERM / SIGINT. ``orderstream worker`` / ``serve`` run the same worker
through :class:`~orderstream.sagas.fulfilment.saga.FulfilmentSaga`; this entry
point needs no read store, which makes it handy for tests that kill a worker
with SIGKILL mid-saga.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from temporalio.client import Client
from temporalio.worker import UnsandboxedWorkflowRunner, Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from orderstream import logging_setup, tracing
from orderstream.application.commands import CommandHandler
from orderstream.application.snapshots import SnapshotStore
from orderstream.application.use_cases import UseCases
from orderstream.config import Settings
from orderstream.events import registry
from orderstream.metrics import Metrics
from orderstream.sagas.fulfilment.activities import FulfilmentActivities
from orderstream.sagas.fulfilment.inputs import DEFAULT_TASK_QUEUE
from orderstream.sagas.fulfilment.outcome_metrics import SagaOutcomeMetrics
from orderstream.sagas.fulfilment.payment_gateway import PaymentGateway, SandboxPaymentGateway
from orderstream.sagas.fulfilment.settings import WorkerTuning
from orderstream.sagas.fulfilment.workflow import OrderFulfilment
from orderstream.sagas.payloads import with_saga_payloads
from orderstream.sagas.runtime import connect

log = logging.getLogger("orderstream.saga")

GRACEFUL_SHUTDOWN = timedelta(seconds=5)
"""How long a stopping worker lets running activities finish."""

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


def build_worker(
    client: Client,
    use_cases: UseCases,
    gateway: PaymentGateway,
    task_queue: str,
    tuning: WorkerTuning | None = None,
    metrics: Metrics | None = None,
) -> Worker:
    """``metrics``: where the sagas' outcomes are counted (:class:`SagaOutcomeMetrics`).
    The worker decodes payloads with msgspec (:mod:`orderstream.sagas.payloads`)."""
    tuning = tuning or WorkerTuning()
    activities = FulfilmentActivities(use_cases, gateway)
    executor = None
    if tuning.workflow_threads:
        executor = ThreadPoolExecutor(tuning.workflow_threads, thread_name_prefix="saga-workflow")
    return Worker(
        with_saga_payloads(client),
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
    log.info("saga worker polling %s (%s)", task_queue, tuning or "the SDK's defaults")
    async with worker:
        await stop.wait()


READY = "order-fulfilment worker ready"
"""Printed on stdout once the worker polls."""


async def serve(
    address: str, event_store_url: str, task_queue: str, transient_failures: int, tuning: WorkerTuning
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    from orderstream.bootstrap import open_event_store  # the composition root imports this module

    store = await open_event_store(event_store_url)
    # The same snapshot interval as the other processes (ORDERSTREAM_SNAPSHOT_EVERY; 0 = off).
    every = Settings.from_env(event_store_url=event_store_url).snapshot_every
    handler = CommandHandler(store, registry, snapshots=SnapshotStore(store, every=every))
    try:
        client = await connect(address)
        gateway = SandboxPaymentGateway(transient_failures=transient_failures)
        use_cases = UseCases(handler, vault=gateway)
        async with build_worker(client, use_cases, gateway, task_queue, tuning):
            print(READY, flush=True)
            await stop.wait()
    finally:
        await handler.close()  # snapshot writes in flight finish before the store closes
        await store.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--temporal-address", required=True, help="host:port of the Temporal frontend")
    parser.add_argument("--event-store", required=True, help="sqlite:///path or kurrentdb://host:2113")
    parser.add_argument("--task-queue", default=DEFAULT_TASK_QUEUE)
    parser.add_argument("--transient-failures", type=int, default=2, help="sandbox: tok_error failures")
    args = parser.parse_args(argv)
    logging_setup.configure(logging.INFO)
    tracing.configure()  # the OTEL_* environment; off unless OTEL_TRACES_EXPORTER is set
    tuning = WorkerTuning.from_env(os.environ)  # this process's composition root: read once, passed in
    asyncio.run(
        serve(args.temporal_address, args.event_store, args.task_queue, args.transient_failures, tuning)
    )


if __name__ == "__main__":
    main()
