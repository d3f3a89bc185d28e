"""What metrics and log context cost a command: ``python -m bench.observability``.

CPU time, not wall time: a command's wall time is mostly its fsync, which drifts
far more between runs (and with other load on the machine) than the few
microseconds measured here.

1. The reference: CPU time per ``UseCases.place_order`` through the plain
   :class:`CommandHandler` on a real SQLite store, one order at a time (the writer
   thread's CPU included).
2. What :class:`MeteredCommandHandler` adds to each command: ``metered.create``
   around an inner handler that answers at once with the result of a real command,
   less that inner call alone (the duration histogram, the result counter, the
   events counter, the log context bound around the command, the debug line skipped
   at INFO), in a loop, inside a request's binding of the correlation id as the API
   does it. ``PYTHONPATH=<other checkout>/src`` measures another version.

Both again in a child process with ``PROMETHEUS_MULTIPROC_DIR`` set, where
prometheus_client writes every value into a memory-mapped file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from orderstream import logging_setup
from orderstream.application.commands import CommandContext, CommandHandler
from orderstream.application.use_cases import LineRequest, UseCases
from orderstream.domain import orders
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.sqlite import SqliteEventStore
from orderstream.metrics import MULTIPROCESS_ENV, MeteredCommandHandler, Metrics
from orderstream.sagas.fulfilment.payment_gateway import SandboxPaymentGateway

ADDRESS = orders.Address(name="Ada", line1="1 Loop St", city="Lyon", postal_code="69001", country="FR")
OBSERVATIONS = 50_000


async def measure(commands: int) -> dict[str, float]:
    """Microseconds of CPU per command: placing an order, and observing one."""
    with tempfile.TemporaryDirectory() as tmp:
        async with await SqliteEventStore.open(Path(tmp) / "events.db") as store:
            plain = UseCases(CommandHandler(store, registry), vault=SandboxPaymentGateway())
            await plain.register_product("SKU-1", "Mug", Money(1999, "EUR"), CommandContext(actor="admin"))
            context = CommandContext(actor="bench")

            async def place() -> object:
                return await plain.place_order(
                    customer_id="c-1",
                    lines=[LineRequest("SKU-1", 2)],
                    shipping_address=ADDRESS,
                    payment_token="tok_approve",
                    context=context,
                )

            result = await place()  # warm up
            started = time.process_time()
            for _ in range(commands):
                result = await place()
            per_command = (time.process_time() - started) / commands

        class Answering:
            """An inner handler that answers every ``create`` with ``result`` at once."""

            clock = plain.handler.clock

            async def create(self, *_args: object, **_kwargs: object) -> object:
                return result

        inner = Answering()
        metered = MeteredCommandHandler(inner, Metrics())  # type: ignore[arg-type]
        command = object()
        with logging_setup.bound(correlation_id=context.correlation_id):
            rounds = []
            for _ in range(3):
                wrapped = await _per_call(metered.create, orders.decider, "order-1", command, context)
                alone = await _per_call(inner.create, orders.decider, "order-1", command, context)
                rounds.append(wrapped - alone)
            per_observation = min(rounds)
    return {"command_us": per_command * 1e6, "observation_us": per_observation * 1e6}


async def _per_call(create: Any, *args: object) -> float:
    """CPU seconds per ``await create(*args[:-1], context=args[-1])``."""
    *positional, context = args
    started = time.process_time()
    for _ in range(OBSERVATIONS):
        await create(*positional, context=context)
    return (time.process_time() - started) / OBSERVATIONS


def report(title: str, figures: dict[str, float]) -> None:
    share = figures["observation_us"] / figures["command_us"]
    print(title)
    print(f"  metrics + log context per command: {figures['observation_us']:7.1f} us CPU")
    print(f"  place_order, plain handler (ref):  {figures['command_us']:7.1f} us CPU   ({share:.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--commands", type=int, default=1000, help="orders placed for the reference")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON (the child)")
    args = parser.parse_args()
    with open(os.devnull, "w") as devnull:
        logging_setup.configure(logging.INFO, fmt="json", stream=devnull)  # as served: JSON, INFO
        figures = asyncio.run(measure(args.commands))
    if args.json:
        print(json.dumps(figures))
        return
    report("in-memory metrics (one process)", figures)
    with tempfile.TemporaryDirectory() as directory:
        child = subprocess.run(
            [sys.executable, "-m", "bench.observability", "--json", "--commands", str(args.commands)],
            env={**os.environ, MULTIPROCESS_ENV: directory},
            capture_output=True,
            text=True,
            check=True,
        )
    report(f"{MULTIPROCESS_ENV} set (memory-mapped files)", json.loads(child.stdout))


if __name__ == "__main__":
    main()
