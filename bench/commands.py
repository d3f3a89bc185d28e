"""Command-path benchmark: ``python -m bench.commands``.

Measures, in one run and on the same disk, each figure beside a reference:

1. ``UseCases.place_order`` (the command handler's lean create path: price from the
   in-process cache, no read of the new stream, one ``NO_STREAM`` append), against
   the ``eventsourcing`` library's ``save`` of a new aggregate (its SQLite
   application, WAL + ``synchronous=FULL``), twice: one order at a time, and from
   ``--callers`` concurrent callers on each side (asyncio tasks for ours, threads
   for ``eventsourcing``, whose application is synchronous and thread-safe).
   Interleaved rounds, totals over the rounds (fsync time drifts on a VM).

   Why both rows: one at a time, both sides pay one fsync per order, so neither can
   beat raw sqlite3's one-fsync-per-insert rate and the ratio says how much each
   adds to it. Our handler's speed under load comes from group commit (concurrent
   appends share one transaction and one fsync); the fair comparison for that is
   ``eventsourcing`` given the same number of concurrent callers, not one.
2. N concurrent reservations of quantity 1 on ONE SKU (the flash sale), keyed like
   the saga's steps, through the product stream's single writer
   (:class:`~orderstream.application.stream_batcher.StreamBatcher`) against the
   plain handler (every command loads, decides and races for the revision, with
   jittered retries). After each, on hand / reserved / available are checked exact:
   nothing oversold, nothing leaked.
3. Single-writer durable appends and 32 writers, against raw ``sqlite3`` with one
   fsync per insert: the figures of :mod:`bench.eventstore_append`, reused.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.eventstore_append import OneWriter, RawSqlite, concurrent_writers, cpu_note
from bench.figures import Figure
from orderstream.application.commands import CommandContext, CommandHandler, CommandResult
from orderstream.application.use_cases import LineRequest, UseCases
from orderstream.domain import inventory, orders
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.sqlite import SqliteEventStore
from orderstream.sagas.fulfilment.payment_gateway import SandboxPaymentGateway

ROUNDS = 20
"""Interleaved rounds of figures 1 and 3: short ones, so that fsync time drifting
(2x within seconds on a busy VM) hits both contenders alike."""
EUR = Money(1999, "EUR")
ADDRESS = orders.Address(name="Ada", line1="1 Loop St", city="Lyon", postal_code="69001", country="FR")
Advance = Callable[[int], None]


def keyed(n: int) -> CommandContext:
    """Every order keyed, as the API's clients do (the wrk scripts send an Idempotency-Key)."""
    return CommandContext(actor="bench", correlation_id=f"c-{n}", idempotency_key=f"k-{n}", request_hash="h")


class EventsourcingOrders:
    """The reference of figure 1: ``eventsourcing``'s save of a new aggregate."""

    def __init__(self, path: Path) -> None:
        from eventsourcing.application import Application
        from eventsourcing.domain import Aggregate, event

        class Order(Aggregate):
            @event("Placed")
            def __init__(self, customer_id: str, sku: str, quantity: int, amount: int) -> None:
                self.customer_id = customer_id
                self.lines = [(sku, quantity, amount)]

        self.order_cls: type[Any] = Order
        self.app: Any = Application(
            env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)}
        )

    def save(self, count: int, figure: Figure, advance: Advance) -> None:
        started = time.perf_counter()
        for n in range(count):
            self.app.save(self.order_cls(customer_id="c-1", sku="SKU-1", quantity=2, amount=1999))
            if n % 50 == 49:
                advance(50)
        figure.seconds += time.perf_counter() - started
        figure.count += count

    def save_concurrently(self, count: int, callers: int, figure: Figure, advance: Advance) -> None:
        """``callers`` threads, each saving its share of ``count`` new aggregates one at a time."""
        share = max(1, count // callers)

        def caller() -> None:
            for _ in range(share):
                self.app.save(self.order_cls(customer_id="c-1", sku="SKU-1", quantity=2, amount=1999))
                advance(1)

        started = time.perf_counter()
        with ThreadPoolExecutor(callers) as pool:
            for future in [pool.submit(caller) for _ in range(callers)]:
                future.result()
        figure.seconds += time.perf_counter() - started
        figure.count += share * callers

    def close(self) -> None:
        self.app.close()


_orders = itertools.count()


async def place_order(use_cases: UseCases, figure: Figure) -> None:
    n = next(_orders)
    t = time.perf_counter()
    await use_cases.place_order(
        customer_id="c-1",
        lines=[LineRequest("SKU-1", 2)],
        shipping_address=ADDRESS,
        payment_token="tok_approve",
        context=keyed(n),
    )
    figure.latencies.append(time.perf_counter() - t)


async def place_orders(use_cases: UseCases, count: int, figure: Figure, advance: Advance) -> None:
    started = time.perf_counter()
    for n in range(count):
        await place_order(use_cases, figure)
        if n % 50 == 49:
            advance(50)
    figure.seconds += time.perf_counter() - started
    figure.count += count


async def place_orders_concurrently(
    use_cases: UseCases, count: int, callers: int, figure: Figure, advance: Advance
) -> None:
    """``callers`` tasks, each placing its share of ``count`` orders one at a time."""
    share = max(1, count // callers)

    async def caller() -> None:
        for _ in range(share):
            await place_order(use_cases, figure)
            advance(1)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    figure.seconds += time.perf_counter() - started
    figure.count += share * callers


@dataclass
class Sale:
    figure: Figure
    retried: int
    failed: int
    appends: int


async def flash_sale(
    store: SqliteEventStore, sku: str, reservations: int, *, batched: bool, advance: Advance
) -> Sale:
    """``reservations`` concurrent keyed reservations of 1 on ``sku`` with exactly that
    much stock; checks the product ends exact."""
    conflicts: list[str] = []
    handler = CommandHandler(store, registry, on_conflict=conflicts.append)
    use_cases = UseCases(handler, vault=SandboxPaymentGateway())
    await use_cases.register_product(sku, "Hot item", EUR, CommandContext(actor="admin"))
    await use_cases.add_stock(sku, reservations, CommandContext(actor="admin"))
    stream = inventory.stream_name(sku)
    figure = Figure()

    async def reserve(n: int) -> CommandResult[inventory.Product]:
        context = CommandContext(actor="saga", idempotency_key=f"wf-{n}/reserve-stock/{sku}")
        t = time.perf_counter()
        try:
            if batched:
                return await use_cases.reserve_stock(sku, f"order-{n}", 1, context)
            command = inventory.ReserveStock(
                sku=sku, order_id=f"order-{n}", quantity=1, now=datetime.now(UTC)
            )
            return await handler.handle(inventory.decider, stream, command, context=context)
        finally:
            figure.latencies.append(time.perf_counter() - t)
            advance(1)

    appends = store.stats.appends
    started = time.perf_counter()
    outcomes = await asyncio.gather(*(reserve(n) for n in range(reservations)), return_exceptions=True)
    figure.seconds = time.perf_counter() - started
    figure.count = sum(isinstance(o, CommandResult) for o in outcomes)
    product = (await handler.load(inventory.decider, stream)).state
    held = figure.count
    assert (product.on_hand, product.reserved, product.available) == (
        reservations,
        held,
        reservations - held,
    ), (
        f"{sku}: on hand {product.on_hand}, reserved {product.reserved}, available {product.available}"
        f" after {held} reservations succeeded"
    )
    return Sale(figure, len(conflicts), reservations - figure.count, store.stats.appends - appends)


@dataclass
class Row:
    what: str
    ours: str
    reference: str
    ratio: float
    target: str
    note: str = ""


def rate(figure: Figure) -> str:
    return f"{figure.rate:,.0f}/s"


def latency(figure: Figure) -> str:
    return f"p50 {figure.percentile(0.5):.2f} ms, p99 {figure.percentile(0.99):.2f} ms"


async def measure(args: argparse.Namespace, folder: Path) -> list[Row]:
    chunk = max(1, args.orders // ROUNDS)
    ours, theirs = Figure(), Figure()
    ours_many, theirs_many = Figure(), Figure()
    raw, single, many = Figure(), Figure(), Figure()
    store = await SqliteEventStore.open(folder / "orderstream.db")
    reference = EventsourcingOrders(folder / "eventsourcing.db")
    raw_sqlite = RawSqlite(folder / "raw.db")
    use_cases = UseCases(CommandHandler(store, registry), vault=SandboxPaymentGateway())
    await use_cases.register_product("SKU-1", "Mug", EUR, CommandContext(actor="admin"))
    columns = (TextColumn("{task.description:<48}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns) as progress:

            def task(description: str, total: int) -> Advance:
                task_id = progress.add_task(description, total=total)
                return lambda n: progress.advance(task_id, n)

            advance_ours = task("1: place-order, CommandHandler", chunk * ROUNDS)
            advance_theirs = task("1: new aggregate, eventsourcing save", chunk * ROUNDS)
            for _ in range(ROUNDS):
                await place_orders(use_cases, chunk, ours, advance_ours)
                reference.save(chunk, theirs, advance_theirs)
            callers = args.callers
            share = max(1, chunk // callers) * callers
            advance_ours = task(f"1: place-order, CommandHandler, {callers} callers", share * ROUNDS)
            advance_theirs = task(f"1: eventsourcing save, {callers} threads", share * ROUNDS)
            for _ in range(ROUNDS):
                await place_orders_concurrently(use_cases, chunk, callers, ours_many, advance_ours)
                await asyncio.to_thread(
                    reference.save_concurrently, chunk, callers, theirs_many, advance_theirs
                )
            n = args.reservations
            batched = await flash_sale(
                store, "HOT-BATCHED", n, batched=True, advance=task(f"2: {n} reservations, batcher", n)
            )
            plain = await flash_sale(
                store, "HOT-PLAIN", n, batched=False, advance=task(f"2: {n} reservations, plain handler", n)
            )
            advance_raw = task("3: raw sqlite3, 1 fsync per insert", chunk * ROUNDS)
            advance_single = task("3: SqliteEventStore, 1 writer", chunk * ROUNDS)
            writer = OneWriter(store)
            for _ in range(ROUNDS):
                raw_sqlite.insert(chunk, raw, advance_raw)
                await writer.append(chunk, single, advance_single)
            per_writer = max(1, args.orders // args.writers)
            advance_many = task(f"3: SqliteEventStore, {args.writers} writers", per_writer * args.writers)
            per_fsync = await concurrent_writers(store, args.orders, args.writers, many, advance_many)
    finally:
        await store.close()
        reference.close()
        raw_sqlite.close()

    return [
        Row("1. place-order, one at a time", rate(ours), f"{rate(theirs)} eventsourcing save",
            ours.rate / theirs.rate, "(see notes)",
            f"{latency(ours)}; both bound by one fsync per order (raw sqlite3: figure 3)"),
        Row(f"1. place-order, {args.callers} concurrent callers", rate(ours_many),
            f"{rate(theirs_many)} eventsourcing save, {args.callers} threads",
            ours_many.rate / theirs_many.rate, ">= 2x", latency(ours_many)),
        Row(f"2. {args.reservations} concurrent reservations, one SKU", rate(batched.figure),
            f"{rate(plain.figure)} plain handler", batched.figure.rate / plain.figure.rate, ">= 1,000/s",
            f"batcher: {batched.appends} append jobs, {batched.retried} retries, {batched.failed} failed, "
            f"{latency(batched.figure)}; plain: {plain.appends} append jobs, {plain.retried} retries, "
            f"{plain.failed} failed (retries exhausted); stock exact in both"),
        Row("3. durable append, 1 writer", rate(single), f"{rate(raw)} raw sqlite3", single.rate / raw.rate,
            ">= 0.9x", f"{latency(single)}; {cpu_note(single, raw)}"),
        Row(f"3. durable append, {args.writers} writers", rate(many), f"{rate(raw)} raw sqlite3",
            many.rate / raw.rate, ">= 3x", f"{per_fsync:.1f} appends per fsync; {latency(many)}"),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.commands", description=__doc__)
    parser.add_argument("--orders", type=int, default=2000, help="orders (and appends) for figures 1 and 3")
    parser.add_argument("--reservations", type=int, default=500, help="concurrent reservations (500)")
    parser.add_argument("--writers", type=int, default=32, help="concurrent writers of figure 3 (32)")
    parser.add_argument("--callers", type=int, default=32, help="concurrent callers of figure 1 (32)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="orderstream-bench-") as folder:
        rows = asyncio.run(measure(args, Path(folder)))
    console = Console(width=max(Console().width, 160))
    table = Table(title="The command path beside references from the same run")
    for name in ("measurement", "orderstream", "reference", "ratio", "target", "notes"):
        table.add_column(name, justify="right" if name in ("orderstream", "reference", "ratio") else "left")
    for row in rows:
        table.add_row(row.what, row.ours, row.reference, f"{row.ratio:.2f}x", row.target, row.note)
    console.print(table)
    console.print(f"ratio = orderstream / reference; total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
