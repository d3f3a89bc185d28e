"""Saga trigger throughput: ``python -m bench.saga_trigger [--orders N] [--in-flight K]``.

N orders are placed first (embedded SQLite event store); then the saga trigger
consumes its group against the Temporal dev server (started here, in memory, no
worker: a start is the trigger's whole job) and the clock runs until the group has
no lag. Reference, same run and server: the same number of other orders' starts made
by calling ``SagaTrigger.handle`` directly, ``K`` at a time, without the subscription
group (no claim, no ack, no lease).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from orderstream.application.commands import CommandContext
from orderstream.application.use_cases import LineRequest
from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.container import Container
from orderstream.domain import orders
from orderstream.domain.common import Money
from orderstream.eventstore.base import EventFilter
from orderstream.sagas.fulfilment.inputs import SEARCH_ATTRIBUTES
from orderstream.sagas.fulfilment.trigger import GROUP, SagaTrigger
from orderstream.sagas.runtime import start_dev_server

ADDRESS = orders.Address(name="Ada", line1="1 Main St", city="Utrecht", postal_code="3511", country="NL")
CTX = CommandContext(actor="bench")


async def placed(folder: Path, count: int) -> Container:
    container = await build(Settings(data_dir=folder))
    await container.use_cases.register_product("MUG", "Mug", Money(500, "EUR"), CTX)
    await container.use_cases.add_stock("MUG", count, CTX)
    for _ in range(count):
        await container.use_cases.place_order(
            customer_id="c",
            lines=[LineRequest("MUG", 1)],
            shipping_address=ADDRESS,
            payment_token="tok_approve",
            context=CTX,
        )
    return container


async def measure(folder: Path, count: int, in_flight: int) -> tuple[float, float]:
    _address, env = await start_dev_server(None, port=None, ui=False, search_attributes=SEARCH_ATTRIBUTES)
    try:
        reference = await placed(folder / "reference", count)
        try:
            trigger = SagaTrigger(reference.event_store, env.client, "bench-ref", max_in_flight=in_flight)
            events = await reference.event_store.read_all(filter=EventFilter(types=("OrderPlaced",)))
            slots = asyncio.Semaphore(in_flight)

            async def start(event: object) -> None:
                async with slots:
                    await trigger.handle(event)  # type: ignore[arg-type]

            started = time.perf_counter()
            await asyncio.gather(*(start(e) for e in events))
            direct = len(events) / (time.perf_counter() - started)
        finally:
            await reference.close()

        container = await placed(folder / "trigger", count)
        try:
            trigger = SagaTrigger(container.event_store, env.client, "bench", max_in_flight=in_flight)
            stop = asyncio.Event()
            started = time.perf_counter()
            task = asyncio.create_task(trigger.run(stop))
            while True:
                await asyncio.sleep(0.02)
                try:
                    info = await container.event_store.subscription_group_info(GROUP)
                except Exception:
                    continue
                if info.lag_events == 0:
                    break
            consumed = count / (time.perf_counter() - started)
            stop.set()
            await task
        finally:
            await container.close()
        return consumed, direct
    finally:
        await env.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.saga_trigger", description=__doc__)
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--in-flight", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="orderstream-bench-") as folder:
        consumed, direct = asyncio.run(measure(Path(folder), args.orders, args.in_flight))
    print(
        f"saga trigger, {args.orders} OrderPlaced -> workflow starts ({args.in_flight} in flight): "
        f"{consumed:,.0f} starts/s   reference: handle() directly, no group {direct:,.0f} starts/s   "
        f"ratio {consumed / direct:.2f}x"
    )


if __name__ == "__main__":
    main()
