"""A standalone order-fulfilment worker process.

    python -m orderstream.sagas.fulfilment.worker \\
        --temporal-address localhost:7233 --event-store sqlite:///data/events.db

It polls the task queue with the ``OrderFulfilment`` workflow and its
activities (over the given event store, with the sandbox payment gateway)
until SIGTERM / SIGINT. ``orderstream worker`` / ``serve`` run the same worker
through the bootstrap hook in :mod:`orderstream.sagas.fulfilment.saga`; this entry point needs
no read store and no settings, which makes it handy for tests that kill a
worker with SIGKILL mid-saga.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence

from orderstream import logging_setup, tracing
from orderstream.application.commands import CommandHandler
from orderstream.application.snapshots import SnapshotStore
from orderstream.application.use_cases import UseCases
from orderstream.bootstrap import open_event_store
from orderstream.config import Settings
from orderstream.events import registry
from orderstream.sagas.fulfilment.inputs import DEFAULT_TASK_QUEUE
from orderstream.sagas.fulfilment.payment_gateway import SandboxPaymentGateway
from orderstream.sagas.runtime import build_worker, connect

READY = "order-fulfilment worker ready"
"""Printed on stdout once the worker polls."""


async def serve(address: str, event_store_url: str, task_queue: str, transient_failures: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    store = await open_event_store(event_store_url)
    # The same snapshot interval as the other processes (ORDERSTREAM_SNAPSHOT_EVERY; 0 = off).
    every = Settings.from_env(event_store_url=event_store_url).snapshot_every
    handler = CommandHandler(store, registry, snapshots=SnapshotStore(store, every=every))
    try:
        client = await connect(address)
        use_cases = UseCases(handler)
        gateway = SandboxPaymentGateway(transient_failures=transient_failures)
        async with build_worker(client, use_cases, gateway, task_queue):
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
    asyncio.run(serve(args.temporal_address, args.event_store, args.task_queue, args.transient_failures))


if __name__ == "__main__":
    main()
