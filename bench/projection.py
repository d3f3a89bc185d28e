"""Projection benchmark: ``python -m bench.projection [--orders N] [--es-url URL]``.

Measures, in one run and on the same disk, each figure beside a reference:

1. Projection throughput: a realistic history (a catalogue registered and stocked,
   N orders placed, some changed, most reserved, some paid, some cancelled) is
   appended first; then the ``orders`` and ``products`` :class:`ProjectionRunner`\\ s
   start from the beginning and the clock runs until both have reached the head
   (``wait_for_position``). Reference: the same number of documents (one per
   event, folded beforehand) written straight to a fresh read store with
   ``write()`` in batches of the runner's ``batch_size``: no subscription, no
   decoding, no fold, no checkpoint.
2. End-to-end lag, append to queryable: with the runners live, orders are placed
   one at a time at a fixed rate (open loop); each is timed from the start of its
   append until ``wait_for_position`` has returned True and ``read_store.get``
   returns the document. Reference: the append latency itself.
3. Rebuild speed: ``ProjectionRunner.rebuild`` of ``orders`` over the whole
   history (into a new table/index, then the alias switch), beside the raw write
   rate of 1.
4. Hot stream: ``--hot-events`` (2,000) stock events (reserve, commit, ...) on ONE
   product stream, projected by the ``products`` runner *live* (appended one event
   per append, ``CONCURRENT_APPENDS`` in flight, while the runner runs; timed from
   the first append until the runner has reached the last) and *catching up*
   (appended first). References: the same events over 50 streams, the same way,
   and the raw ``write()`` of the same documents (one per event, batches of
   ``BATCH_SIZE``), each in a fresh event store and read store.

The event store is always the embedded SQLite one (a fresh file per read store).
The read store is SQLite, and Elasticsearch too when ``--es-url`` (or
``ORDERSTREAM_TEST_ES_URL``) is given; its indices and templates are created under
a fresh prefix and deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import sqlite3
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from rich.console import Console, JustifyMethod
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.figures import Figure
from orderstream.application.projection_runner import EventView, ProjectionRunner
from orderstream.domain import inventory, orders
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.base import ANY, NO_STREAM, EventFilter, EventMetadata, NewEvent
from orderstream.eventstore.sqlite import SqliteEventStore
from orderstream.readstore.base import Document, ReadStore, Upsert
from orderstream.readstore.sqlite import SqliteReadStore
from projections import order_summary
from projections.base import Projection
from projections.registry import ALL_PROJECTIONS

BATCH_SIZE = 256
"""The runner's ``batch_size`` (its default), also the batch size of the raw write reference."""
CONCURRENT_APPENDS = 256
"""Appends in flight while the history is prepared (group commit makes that fast)."""
WAIT_TIMEOUT = 600.0

Step = tuple[str, list[msgspec.Struct]]
"""One append: a stream and its domain events."""
Advance = Callable[[int], None]


# ---------------------------------------------------------------------- the history


class _Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=37)
        return self.now


def _address(rng: random.Random, n: int) -> orders.Address:
    city = rng.choice(["Lyon", "Gent", "Porto", "Graz", "Turku", "Brno", "Cork", "Bergen"])
    return orders.Address(
        name=f"Customer {n}",
        line1=f"{rng.randint(1, 200)} Harbour Street",
        city=city,
        postal_code=f"{rng.randint(1000, 99999)}",
        country=rng.choice(["FR", "BE", "PT", "AT", "FI", "CZ", "IE", "NO"]),
    )


def plan_history(order_count: int, product_count: int, seed: int) -> list[list[Step]]:
    """Phases of appends; within a phase the appends run concurrently, so the
    events of different streams interleave in ``$all`` as in production."""
    rng = random.Random(seed)
    clock = _Clock(datetime.now(UTC) - timedelta(days=1))
    skus = [f"SKU-{n:05d}" for n in range(max(3, product_count))]
    prices = {sku: Money(rng.randint(199, 19_999), "EUR") for sku in skus}
    catalogue: list[Step] = [
        (
            inventory.stream_name(sku),
            [
                inventory.ProductRegistered(sku=sku, name=f"Product {sku}", price=prices[sku], at=clock()),
                inventory.StockAdded(sku=sku, quantity=1_000_000, at=clock()),
            ],
        )
        for sku in skus
    ]
    placed: list[Step] = []
    changed: list[Step] = []
    reserved: list[Step] = []
    paid: list[Step] = []
    cancelled: list[Step] = []

    def order_lines() -> tuple[orders.OrderLine, ...]:
        chosen = rng.sample(skus, rng.randint(1, 3))
        return tuple(
            orders.OrderLine(sku=s, quantity=rng.randint(1, 5), unit_price=prices[s]) for s in chosen
        )

    for n in range(order_count):
        order_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        stream = orders.stream_name(order_id)
        lines = order_lines()
        placed.append(
            (
                stream,
                [
                    orders.OrderPlaced(
                        order_id=order_id,
                        customer_id=f"customer-{rng.randint(1, max(1, order_count // 4))}",
                        lines=lines,
                        total=orders.total_of(lines),
                        shipping_address=_address(rng, n),
                        payment_method_id="pm_sbx_approve_bench",
                        placed_at=clock(),
                    )
                ],
            )
        )
        if rng.random() < 0.15:
            change: msgspec.Struct
            if rng.random() < 0.5:
                lines = order_lines()
                change = orders.OrderLinesChanged(
                    order_id=order_id, lines=lines, total=orders.total_of(lines), at=clock()
                )
            else:
                change = orders.OrderShippingAddressChanged(
                    order_id=order_id, shipping_address=_address(rng, n), at=clock()
                )
            changed.append((stream, [change]))
        if rng.random() < 0.8:  # the saga reserved the stock
            for line in lines:
                event = inventory.StockReserved(
                    sku=line.sku, order_id=order_id, quantity=line.quantity, at=clock()
                )
                reserved.append((inventory.stream_name(line.sku), [event]))
            reserved.append((stream, [orders.OrderStockReserved(order_id=order_id, at=clock())]))
            roll = rng.random()
            if roll < 0.1:
                for line in lines:
                    release = inventory.StockReleased(
                        sku=line.sku,
                        order_id=order_id,
                        quantity=line.quantity,
                        reason="cancelled",
                        at=clock(),
                    )
                    cancelled.append((inventory.stream_name(line.sku), [release]))
                cancel = orders.OrderCancelled(
                    order_id=order_id, reason="customer", previous_status="stock_reserved", at=clock()
                )
                cancelled.append((stream, [cancel]))
            elif roll < 0.6:
                payment_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
                paid.append(
                    (
                        stream,
                        [
                            orders.OrderPaymentAuthorised(
                                order_id=order_id, payment_id=payment_id, at=clock()
                            ),
                            orders.OrderConfirmed(order_id=order_id, at=clock()),
                        ],
                    )
                )
        elif rng.random() < 0.5:
            cancel = orders.OrderCancelled(
                order_id=order_id, reason="customer", previous_status="placed", at=clock()
            )
            cancelled.append((stream, [cancel]))
    return [catalogue, placed, changed, reserved, paid, cancelled]


async def append_history(store: SqliteEventStore, phases: list[list[Step]], advance: Advance) -> None:
    metadata = EventMetadata(actor="bench", correlation_id="bench-history")
    for phase in phases:
        for start in range(0, len(phase), CONCURRENT_APPENDS):
            chunk = phase[start : start + CONCURRENT_APPENDS]
            await asyncio.gather(
                *(
                    store.append(
                        stream,
                        [registry.to_new_event(e, event_id=uuid.uuid4(), metadata=metadata) for e in events],
                        ANY,
                    )
                    for stream, events in chunk
                )
            )
            advance(sum(len(events) for _, events in chunk))


def matching_filter(projection: Projection) -> EventFilter:
    return EventFilter(categories=tuple(projection.categories), types=tuple(sorted(projection.handles)))


async def folded_documents(store: SqliteEventStore, projection: Projection) -> list[Upsert]:
    """One upsert per event: the document as it is after that event (the raw reference's input)."""
    ops: list[Upsert] = []
    documents: dict[str, Document | None] = {}
    after: int | None = None
    while page := await store.read_all(after=after, filter=matching_filter(projection), limit=1000):
        for recorded in page:
            view = EventView.from_recorded(recorded, registry)
            doc_id = projection.document_id(view)
            document = projection.fold(documents.get(doc_id), view)
            documents[doc_id] = document
            if document is not None:
                ops.append(Upsert(id=doc_id, version=view.revision, document=document))
        after = page[-1].position
    return ops


# ---------------------------------------------------------------------- measurements


async def raw_writes(
    read_store: ReadStore, documents: Sequence[tuple[Projection, list[Upsert]]], advance: Advance
) -> Figure:
    physicals = [await read_store.ensure_collection(p.schema) for p, _ in documents]
    figure = Figure()
    started = time.perf_counter()
    for (projection, ops), physical in zip(documents, physicals, strict=True):
        for start in range(0, len(ops), BATCH_SIZE):
            batch = ops[start : start + BATCH_SIZE]
            await read_store.write(projection.schema.name, batch, physical=physical)
            advance(len(batch))
        figure.count += len(ops)
    figure.seconds = time.perf_counter() - started
    return figure


@dataclass
class CatchUp:
    total: Figure
    per_runner: dict[str, Figure]
    batches: int
    writer_jobs: int
    """Event-store writes meanwhile: claims, acks, nacks."""


@dataclass
class Live:
    runners: dict[str, ProjectionRunner]
    stop: asyncio.Event
    tasks: list[asyncio.Task[None]]

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def catch_up(
    store: SqliteEventStore, read_store: ReadStore, expected: dict[str, int], advance: Advance
) -> tuple[CatchUp, Live]:
    """Start both runners from the beginning; time until each has reached the head."""
    head = await store.head_position()
    assert head is not None
    batches = 0
    catching_up = True

    def applied(_name: str, count: int) -> None:
        nonlocal batches
        if catching_up:  # the runners stay live for figure 2
            batches += 1
            advance(count)

    runners = {
        p.schema.name: ProjectionRunner(store, read_store, p, batch_size=BATCH_SIZE, on_applied=applied)
        for p in ALL_PROJECTIONS
    }
    stop = asyncio.Event()
    per_runner = {name: Figure(count=expected[name]) for name in runners}
    jobs = store.stats.jobs
    started = time.perf_counter()
    tasks = [asyncio.create_task(r.run(stop), name=f"bench-{name}") for name, r in runners.items()]
    live = Live(runners, stop, tasks)

    async def reach(name: str, runner: ProjectionRunner) -> None:
        if not await runner.wait_for_position(head, timeout=WAIT_TIMEOUT):
            raise TimeoutError(f"{name} did not reach position {head} in {WAIT_TIMEOUT:.0f} s")
        per_runner[name].seconds = time.perf_counter() - started

    try:
        await asyncio.gather(*(reach(name, r) for name, r in runners.items()))
    except BaseException:
        await live.close()
        raise
    catching_up = False
    total = Figure(count=sum(expected.values()), seconds=max(f.seconds for f in per_runner.values()))
    return CatchUp(total, per_runner, batches, store.stats.jobs - jobs), live


@dataclass
class Lag:
    append: Figure
    visible: Figure
    late: int = 0
    """Orders whose document was not there right after ``wait_for_position`` returned."""


async def end_to_end_lag(
    store: SqliteEventStore,
    read_store: ReadStore,
    runner: ProjectionRunner,
    rate: float,
    count: int,
    seed: int,
    advance: Advance,
) -> Lag:
    """Open loop: order k is placed at ``start + k / rate`` whatever the earlier ones do."""
    steps = plan_history(count, 50, seed)[1]  # OrderPlaced only
    lag = Lag(Figure(), Figure())
    metadata = EventMetadata(actor="bench", correlation_id="bench-lag")
    loop = asyncio.get_running_loop()
    begin = loop.time() + 0.05

    async def one(k: int, stream: str, event: msgspec.Struct) -> None:
        await asyncio.sleep(max(0.0, begin + k / rate - loop.time()))
        new = registry.to_new_event(event, event_id=uuid.uuid4(), metadata=metadata)
        order_id = stream.partition("-")[2]
        started = time.perf_counter()
        result = await store.append(stream, [new], NO_STREAM)
        lag.append.latencies.append(time.perf_counter() - started)
        if not await runner.wait_for_position(result.position, timeout=WAIT_TIMEOUT):
            raise TimeoutError(f"order {order_id} not projected in {WAIT_TIMEOUT:.0f} s")
        if await read_store.get(runner.name, order_id) is None:
            lag.late += 1
            for _ in range(int(WAIT_TIMEOUT * 1000)):
                await asyncio.sleep(0.001)
                if await read_store.get(runner.name, order_id) is not None:
                    break
            else:
                raise TimeoutError(f"order {order_id} projected but not readable")
        lag.visible.latencies.append(time.perf_counter() - started)
        advance(1)

    started = time.perf_counter()
    await asyncio.gather(*(one(k, stream, events[0]) for k, (stream, events) in enumerate(steps)))
    lag.append.count = lag.visible.count = count
    lag.visible.seconds = time.perf_counter() - started
    return lag


async def rebuild(
    store: SqliteEventStore, read_store: ReadStore, progress: Callable[[int, int], None]
) -> tuple[Figure, int]:
    runner = ProjectionRunner(store, read_store, order_summary.projection, batch_size=BATCH_SIZE)
    started = time.perf_counter()
    result = await runner.rebuild(progress)
    figure = Figure(count=result.events, seconds=time.perf_counter() - started)
    return figure, result.failed


# ---------------------------------------------------------------------- hot streams


HOT_REFERENCE_STREAMS = 50


def hot_events(count: int, streams: int) -> list[tuple[str, msgspec.Struct]]:
    """``count`` events over ``streams`` product streams, round robin: each product
    registered and stocked, then reserve/commit pairs (the document stays small)."""
    at = datetime(2024, 5, 1, tzinfo=UTC)
    skus = [f"HOT{n:03d}" for n in range(streams)]
    steps: list[tuple[str, msgspec.Struct]] = []
    for sku in skus:
        price = Money(100, "EUR")
        steps.append((sku, inventory.ProductRegistered(sku=sku, name=f"Hot {sku}", price=price, at=at)))
        steps.append((sku, inventory.StockAdded(sku=sku, quantity=count, at=at)))
    k = 0
    while len(steps) < count:
        sku = skus[k % streams]
        order = f"o{k // 2}"
        event: msgspec.Struct = (
            inventory.StockReserved(sku=sku, order_id=order, quantity=1, at=at)
            if k % 2 == 0
            else inventory.StockCommitted(sku=sku, order_id=order, quantity=1, at=at)
        )
        steps.append((sku, event))
        k += 1
    return steps[:count]


async def _append_each(store: SqliteEventStore, steps: Sequence[tuple[str, msgspec.Struct]]) -> int:
    """One event per append, CONCURRENT_APPENDS in flight (group commit), each stream in order."""
    metadata = EventMetadata(actor="bench", correlation_id="bench-hot")
    by_stream: dict[str, list[msgspec.Struct]] = {}
    for sku, event in steps:
        by_stream.setdefault(inventory.stream_name(sku), []).append(event)
    position = -1
    gate = asyncio.Semaphore(CONCURRENT_APPENDS)

    async def stream_writer(stream: str, events: list[msgspec.Struct]) -> None:
        nonlocal position
        for event in events:  # a stream's appends in order, as its aggregate would make them
            async with gate:
                new = registry.to_new_event(event, event_id=uuid.uuid4(), metadata=metadata)
                result = await store.append(stream, [new], ANY)
            position = max(position, result.position)

    if len(by_stream) == 1:  # one stream: keep CONCURRENT_APPENDS in flight anyway (ANY, in order)
        ((stream, events),) = by_stream.items()
        news = [registry.to_new_event(e, event_id=uuid.uuid4(), metadata=metadata) for e in events]

        async def one(new: NewEvent) -> None:
            nonlocal position
            async with gate:
                position = max(position, (await store.append(stream, [new], ANY)).position)

        await asyncio.gather(*(one(new) for new in news))
    else:
        await asyncio.gather(*(stream_writer(stream, events) for stream, events in by_stream.items()))
    return position


async def hot_projection(
    backend: Backend, folder: Path, tag: str, steps: Sequence[tuple[str, msgspec.Struct]], *, live: bool
) -> Figure:
    """Events applied per second by the ``products`` runner (see 4 in the module docstring)."""
    from projections import product_stock

    store = await SqliteEventStore.open(folder / f"events-{backend.label}-{tag}.db")
    read_store = await backend.open_read_store(tag)
    stop = asyncio.Event()
    runner = ProjectionRunner(store, read_store, product_stock.projection, batch_size=BATCH_SIZE)
    task: asyncio.Task[None] | None = None
    try:
        if live:
            task = asyncio.create_task(runner.run(stop))
            # the runner's group and collection in place before the clock starts
            while await runner.reached_position() is None and not task.done():
                first = await _append_each(store, steps[:1])
                await runner.wait_for_position(first, 5.0)
            started = time.perf_counter()
            last = await _append_each(store, steps[1:])
        else:
            last = await _append_each(store, steps)
            started = time.perf_counter()
            task = asyncio.create_task(runner.run(stop))
        if not await runner.wait_for_position(last, timeout=WAIT_TIMEOUT):
            raise TimeoutError(f"products did not reach {last} in {WAIT_TIMEOUT:.0f} s")
        return Figure(count=len(steps) - (1 if live else 0), seconds=time.perf_counter() - started)
    finally:
        stop.set()
        if task is not None:
            await task
        await read_store.close()
        await store.close()


async def hot_raw_write(backend: Backend, steps: Sequence[tuple[str, msgspec.Struct]]) -> Figure:
    """The documents after each event, written with write() in batches: the reference."""
    from projections import product_stock

    projection = product_stock.projection
    documents: dict[str, Document | None] = {}
    revisions: dict[str, int] = {}
    ops: list[Upsert] = []
    for sku, event in steps:
        stream = inventory.stream_name(sku)
        revision = revisions.get(stream, -1) + 1
        revisions[stream] = revision
        view = EventView(
            type=registry.type_name(event),
            stream=stream,
            revision=revision,
            position=len(ops) + 1,
            data=msgspec.to_builtins(event),
            recorded_at_iso="2024-05-01T00:00:00Z",
        )
        document = projection.fold(documents.get(sku), view)
        documents[sku] = document
        if document is not None:
            ops.append(Upsert(id=sku, version=revision, document=document))
    read_store = await backend.open_read_store("hot-raw")
    try:
        figure = await raw_writes(read_store, [(projection, ops)], lambda _n: None)
    finally:
        await read_store.close()
    figure.count = len(steps)
    return figure


async def hot_rows(backend: Backend, args: argparse.Namespace, folder: Path, progress: Progress) -> list[Row]:
    count = args.hot_events
    one = hot_events(count, 1)
    many = hot_events(count, HOT_REFERENCE_STREAMS)
    task = progress.add_task(f"{backend.label}: 4 hot stream (runs)", total=5)
    raw = await hot_raw_write(backend, one)
    progress.advance(task)
    figures: dict[tuple[bool, int], Figure] = {}
    for live in (True, False):
        for streams, steps in ((1, one), (HOT_REFERENCE_STREAMS, many)):
            tag = f"hot-{'live' if live else 'catchup'}-{streams}"
            figures[live, streams] = await hot_projection(backend, folder, tag, steps, live=live)
            progress.advance(task)
    rows = []
    for live in (True, False):
        mode = "live" if live else "catch-up"
        hot, spread = figures[live, 1], figures[live, HOT_REFERENCE_STREAMS]
        rows.append(
            Row(
                f"4 hot stream, {mode}: {count:,} events on 1 stream",
                f"{hot.rate:,.0f} events/s",
                f"{spread.rate:,.0f} events/s over {HOT_REFERENCE_STREAMS} streams",
                hot.rate / spread.rate,
                "higher",
                f"{hot.seconds:.2f} s vs {spread.seconds:.2f} s; raw write() of the same documents "
                f"{raw.rate:,.0f} docs/s ({hot.rate / raw.rate:.2f}x)",
            )
        )
    return rows


# ---------------------------------------------------------------------- backends


@dataclass
class Backend:
    name: str
    label: str
    """Short, for the progress bars."""
    open_read_store: Callable[[str], Awaitable[ReadStore]]
    """By role: ``live`` (the runners') or ``reference`` (the raw writes')."""
    cleanup: Callable[[], Awaitable[None]]


def sqlite_backend(folder: Path) -> Backend:
    async def open_store(role: str) -> ReadStore:
        return await SqliteReadStore.open(folder / f"read-{role}.db")

    async def nothing() -> None:
        return None

    return Backend(f"SQLite {sqlite3.sqlite_version}", "sqlite", open_store, nothing)


async def elasticsearch_backend(url: str) -> Backend:
    from elasticsearch import AsyncElasticsearch

    from orderstream.readstore.elasticsearch import ElasticsearchReadStore

    prefix = f"bench-{uuid.uuid4().hex[:8]}-"
    client = AsyncElasticsearch(url, request_timeout=30)
    try:
        info = await client.info()
    except Exception:
        await client.close()
        raise
    version = info["version"]["number"]

    async def open_store(role: str) -> ReadStore:
        return await ElasticsearchReadStore.open(url, prefix=f"{prefix}{role}-")

    async def cleanup() -> None:
        try:
            indices = await client.indices.get(index=f"{prefix}*", expand_wildcards="all")
            for index in indices.body:
                await client.indices.delete(index=index, ignore_unavailable=True)
            with contextlib.suppress(Exception):  # none matching: 404
                templates = await client.indices.get_index_template(name=f"{prefix}*")
                for template in templates["index_templates"]:
                    await client.indices.delete_index_template(name=template["name"])
        finally:
            await client.close()

    return Backend(f"Elasticsearch {version}", "es", open_store, cleanup)


# ---------------------------------------------------------------------- main


@dataclass
class Row:
    what: str
    ours: str
    reference: str
    ratio: float
    better: str
    note: str = ""


@dataclass
class Result:
    backend: str
    events: int
    rows: list[Row]


async def measure_backend(
    backend: Backend, args: argparse.Namespace, folder: Path, progress: Progress
) -> Result:
    label = backend.label

    def task(description: str, total: int | None) -> TaskID:
        return progress.add_task(f"{label}: {description}", total=total)

    def advancer(task_id: TaskID) -> Advance:
        return lambda n: progress.advance(task_id, n)

    phases = plan_history(args.orders, args.products, args.seed)
    history_events = sum(len(events) for phase in phases for _, events in phase)
    store = await SqliteEventStore.open(folder / f"events-{label}.db")
    live_store = await backend.open_read_store("live")
    reference_store = await backend.open_read_store("reference")
    live: Live | None = None
    try:
        await append_history(store, phases, advancer(task("prepare the history (events)", history_events)))
        documents = [(p, await folded_documents(store, p)) for p in ALL_PROJECTIONS]
        expected = {p.schema.name: len(ops) for p, ops in documents}
        total_docs = sum(expected.values())

        reference = await raw_writes(
            reference_store, documents, advancer(task("1 raw write() (documents)", total_docs))
        )
        caught, live = await catch_up(
            store, live_store, expected, advancer(task("1 projection catch-up (events)", total_docs))
        )
        count = max(1, round(args.lag_rate * args.lag_seconds))
        lag = await end_to_end_lag(
            store,
            live_store,
            live.runners[order_summary.NAME],
            args.lag_rate,
            count,
            args.seed + 1,
            advancer(task(f"2 append to queryable, {args.lag_rate:g}/s (orders)", count)),
        )
        await live.close()
        live = None
        rebuild_task = task("3 rebuild orders (position)", None)
        rebuilt, failed = await rebuild(
            store, live_store, lambda pos, head: progress.update(rebuild_task, completed=pos, total=head)
        )
    finally:
        if live is not None:
            await live.close()
        await live_store.close()
        await reference_store.close()
        await store.close()

    runners = ", ".join(f"{name} {f.rate:,.0f}/s" for name, f in caught.per_runner.items())
    rows = [
        Row(
            "1 projection catch-up, 2 runners",
            f"{caught.total.rate:,.0f} events/s",
            f"{reference.rate:,.0f} docs/s raw write()",
            caught.total.rate / reference.rate,
            "higher",
            f"{caught.total.count:,} events in {caught.total.seconds:.1f} s ({runners}); "
            f"{caught.total.count / max(1, caught.batches):.0f} events per batch, "
            f"{caught.writer_jobs / caught.total.count:.2f} event-store writes per event; "
            f"raw: batches of {BATCH_SIZE}",
        ),
        Row(
            f"2 append to queryable, {args.lag_rate:g} orders/s",
            f"p50 {lag.visible.percentile(0.5):.1f} ms, p99 {lag.visible.percentile(0.99):.1f} ms",
            f"p50 {lag.append.percentile(0.5):.1f} ms, p99 {lag.append.percentile(0.99):.1f} ms append",
            lag.visible.percentile(0.5) / lag.append.percentile(0.5),
            "lower",
            f"{count} orders, open loop; wait_for_position + get"
            + (f"; {lag.late} not yet visible after the wait" if lag.late else ""),
        ),
        Row(
            "3 rebuild orders",
            f"{rebuilt.rate:,.0f} events/s",
            f"{reference.rate:,.0f} docs/s raw write()",
            rebuilt.rate / reference.rate,
            "higher",
            f"{rebuilt.count:,} events in {rebuilt.seconds:.1f} s"
            + (f", {failed} failed" if failed else "")
            + f"; {rebuilt.rate / caught.per_runner[order_summary.NAME].rate:.2f}x the live orders runner",
        ),
    ]
    rows += await hot_rows(backend, args, folder, progress)
    return Result(backend.name, history_events, rows)


async def measure(args: argparse.Namespace, folder: Path) -> list[Result]:
    backends = [sqlite_backend(folder)]
    if args.es_url:
        backends.append(await elasticsearch_backend(args.es_url))
    columns = (TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    results = []
    try:
        with Progress(*columns) as progress:
            for backend in backends:
                results.append(await measure_backend(backend, args, folder, progress))
    finally:
        for backend in backends:
            await backend.cleanup()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.projection", description=__doc__)
    parser.add_argument("--orders", type=int, default=600, help="orders in the history (600)")
    parser.add_argument("--products", type=int, default=200, help="products in the catalogue (200)")
    parser.add_argument(
        "--es-url",
        default=os.environ.get("ORDERSTREAM_TEST_ES_URL"),
        help="also measure the Elasticsearch read store (default: $ORDERSTREAM_TEST_ES_URL)",
    )
    parser.add_argument("--lag-rate", type=float, default=50.0, help="orders per second for figure 2 (50)")
    parser.add_argument("--lag-seconds", type=float, default=4.0, help="duration of figure 2 (4)")
    parser.add_argument("--seed", type=int, default=7, help="of the generated history (7)")
    parser.add_argument(
        "--hot-events", type=int, default=2000, help="events on the one hot stream of figure 4 (2000)"
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="orderstream-bench-") as folder:
        results = asyncio.run(measure(args, Path(folder)))
    console = Console(width=max(Console().width, 160))
    for result in results:
        table = Table(
            title=f"Projections: SQLite event store ({result.events:,} events of history) + {result.backend}"
            " read store, beside references from the same run"
        )
        for name in ("measurement", "orderstream", "reference", "ratio", "better", "notes"):
            justify: JustifyMethod = "right" if name in ("orderstream", "reference", "ratio") else "left"
            table.add_column(name, justify=justify)
        for row in result.rows:
            table.add_row(row.what, row.ours, row.reference, f"{row.ratio:.2f}x", row.better, row.note)
        console.print(table)
    console.print(f"ratio = orderstream / reference; total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
