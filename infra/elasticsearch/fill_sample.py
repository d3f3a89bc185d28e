"""Fill the read models with a small, varied, reproducible sample of orders: for trying
the analyst queries of the README and the Kibana dashboard on a development node.

The events go through the real write path (the use cases, on a SQLite event store in
a temporary directory, with a clock that advances as a shop's day would), and the read
models are built by the real projection rebuild into the read store given, e.g. an
Elasticsearch node with an index prefix of your own:

    python infra/elasticsearch/fill_sample.py --read-store 'http://127.0.0.1:9200?prefix=demo-'

Delete the indices afterwards (``curl -X DELETE 'http://127.0.0.1:9200/demo-*'`` is
refused by default in 8.x: name them, see the README).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from orderstream.application.commands import CommandContext
from orderstream.application.use_cases import LineRequest, UseCases, order_id_for
from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.domain import orders
from orderstream.domain.common import Money

PRODUCTS = {
    "EUR": [
        ("TEA-ASSAM", "Assam tea", 450),
        ("TEA-DARJ", "Darjeeling tea", 650),
        ("MUG-BLUE", "Blue mug", 900),
    ],
    "USD": [("KETTLE-CU", "Copper kettle", 3900), ("TEA-SENCHA", "Sencha green tea", 700)],
}
PLACES = {
    "EUR": [
        ("Paris", "75001", "FR"),
        ("Berlin", "10115", "DE"),
        ("Dublin", "D02", "IE"),
        ("Lyon", "69001", "FR"),
    ],
    "USD": [("Boston", "02108", "US"), ("Austin", "73301", "US")],
}
CANCEL_REASONS = ["changed my mind", "found it cheaper elsewhere", "delivery too slow"]


Step = tuple[datetime, int, int, Callable[[], Awaitable[object]]]
"""(when, order number, step number, the command): run in time order, across orders."""


def order_steps(use: UseCases, rng: random.Random, n: int, placed_at: datetime, seed: int) -> list[Step]:
    """One order's life: placed, then rejected, or reserved and then cancelled, left
    unpaid, or paid, confirmed and shipped hours to days later."""
    currency = rng.choice(["EUR", "EUR", "USD"])
    chosen = rng.sample(PRODUCTS[currency], k=rng.randint(1, 2))
    lines = [LineRequest(sku=sku, quantity=rng.randint(1, 4)) for sku, _, _ in chosen]
    city, postal_code, country = rng.choice(PLACES[currency])
    address = orders.Address(
        name=f"Customer {n}", line1=f"{n} High St", city=city, postal_code=postal_code, country=country
    )
    context = CommandContext(actor="sample", idempotency_key=f"sample-{seed}-{n}")
    order_id = order_id_for(context)
    stock = tuple(orders.StockLine(sku=line.sku, quantity=line.quantity) for line in lines)
    plain = CommandContext(actor="sample")
    at = placed_at
    steps: list[tuple[datetime, Callable[[], Awaitable[object]]]] = []

    def then(delay: timedelta, step: Callable[[], Awaitable[object]]) -> None:
        nonlocal at
        at += delay
        steps.append((at, step))

    then(
        timedelta(0),
        lambda: use.place_order(
            customer_id=f"cust-{n % 7}",
            lines=lines,
            shipping_address=address,
            payment_token="tok",
            context=context,
        ),
    )
    fate = rng.random()
    if fate < 0.1:
        then(timedelta(minutes=rng.randint(1, 5)), lambda: reject(use, order_id, plain))
        return [(when, n, i, step) for i, (when, step) in enumerate(steps)]
    then(timedelta(minutes=rng.randint(1, 20)), lambda: reserve(use, order_id, lines, stock, plain))
    if fate < 0.3:
        reason = rng.choice(CANCEL_REASONS)
        then(timedelta(hours=rng.randint(1, 30)), lambda: cancel(use, order_id, lines, reason, plain))
    elif fate < 0.9:
        then(timedelta(minutes=rng.randint(1, 10)), lambda: pay(use, order_id, f"pay-{n}", plain))
        then(timedelta(minutes=rng.randint(120, 4320)), lambda: ship(use, order_id, lines, f"TRK-{n}", plain))
    # else: still waiting for its payment
    return [(when, n, i, step) for i, (when, step) in enumerate(steps)]


async def reject(use: UseCases, order_id: str, context: CommandContext) -> None:
    now = use.handler.clock()
    await use.order_command(orders.RejectOrder(order_id=order_id, reason="out of stock", now=now), context)


async def reserve(
    use: UseCases,
    order_id: str,
    lines: list[LineRequest],
    stock: tuple[orders.StockLine, ...],
    context: CommandContext,
) -> None:
    for line in lines:
        await use.reserve_stock(line.sku, order_id, line.quantity, context)
    now = use.handler.clock()
    await use.order_command(orders.MarkStockReserved(order_id=order_id, lines=stock, now=now), context)


async def cancel(
    use: UseCases, order_id: str, lines: list[LineRequest], reason: str, context: CommandContext
) -> None:
    for line in lines:
        await use.release_stock(line.sku, order_id, "order cancelled", context)
    await use.cancel_order(order_id, reason, context)


async def pay(use: UseCases, order_id: str, payment_id: str, context: CommandContext) -> None:
    now = use.handler.clock()
    await use.order_command(
        orders.MarkPaymentAuthorised(order_id=order_id, payment_id=payment_id, now=now), context
    )
    await use.order_command(orders.ConfirmOrder(order_id=order_id, now=now), context)


async def ship(
    use: UseCases, order_id: str, lines: list[LineRequest], tracking: str, context: CommandContext
) -> None:
    for line in lines:
        await use.commit_stock(line.sku, order_id, context)
    now = use.handler.clock()
    await use.order_command(orders.ShipOrder(order_id=order_id, tracking_number=tracking, now=now), context)


async def fill(read_store: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=count // 3 + 4)
    with tempfile.TemporaryDirectory() as data_dir:
        container = await build(Settings(data_dir=Path(data_dir), read_store_url=read_store))
        try:
            use = container.use_cases
            now = start
            container.handler.clock = lambda: now  # event time: the schedule's, not the machine's
            context = CommandContext(actor="sample")
            for currency, products in PRODUCTS.items():
                for sku, name, price in products:
                    await use.register_product(sku, name, Money(price, currency), context)
                    await use.add_stock(sku, 500, context)
            steps: list[Step] = []
            placed_at = start
            for n in range(count):
                placed_at += timedelta(minutes=rng.randint(120, 840))
                steps += order_steps(use, rng, n, placed_at, seed)
            for when, _, _, step in sorted(steps, key=lambda s: s[:3]):
                now = when
                await step()
            for name, runner in container.runners.items():
                result = await runner.rebuild()
                print(f"{name}: {result.physical} from {result.events} events")
        finally:
            await container.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--read-store", required=True, help="e.g. http://127.0.0.1:9200?prefix=demo-")
    parser.add_argument("--orders", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    asyncio.run(fill(args.read_store, args.orders, args.seed))


if __name__ == "__main__":
    main()
