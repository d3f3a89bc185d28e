"""Event store benchmark: ``python -m bench.eventstore_append [--events N]``.

Measures, in one run and on the same disk, each figure beside a reference:

1. ``SqliteEventStore`` durable appends, one writer, one event per append
   (expected revision checked), against raw ``sqlite3`` inserts with the same
   schema and durability (WAL, ``synchronous=FULL``, one transaction per insert).
2. 32 concurrent writers on distinct streams (group commit), against the same
   raw loop: one fsync per command is the limit group commit must beat.
3. Loading a 10,000-event stream (``read_stream`` + decoding every event's JSON)
   against a raw ``SELECT`` + decode of the same rows.

When ``eventsourcing`` is installed, its SQLite application (also WAL +
``synchronous=FULL``) is a second reference for 1 and 3.

fsync time on a VM drifts by 2x within seconds, so the contenders of 1 run in
interleaved rounds and each figure is the total over its rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.figures import Figure
from orderstream.eventstore.base import ANY, NO_STREAM, EventMetadata, Expected, NewEvent
from orderstream.eventstore.sqlite import SqliteEventStore
from orderstream.eventstore.sqlite_schema import connect, create_schema

DATA = msgspec.json.encode({"order_id": "7f3c", "sku": "SKU-1", "quantity": 2, "price": {"amount": 1999}})
METADATA = EventMetadata(actor="bench", correlation_id="c-1", causation_id="k-1")
ROUNDS = 20
"""Interleaved rounds of figure 1: short ones, so that fsync time drifting (2x within
seconds on a busy VM) hits every contender alike."""


def new_event() -> NewEvent:
    return NewEvent(id=uuid.uuid4(), type="OrderPlaced", data=DATA, metadata=METADATA)


# ---------------------------------------------------------------------- references


class RawSqlite:
    """The backend limit: raw sqlite3, same schema and durability, one transaction per insert."""

    def __init__(self, path: Path) -> None:
        self.conn = connect(str(path), writer=True)
        create_schema(self.conn)
        self.revision = 0

    def insert(self, count: int, figure: Figure, advance: Callable[[int], None]) -> None:
        conn = self.conn
        started, cpu = time.perf_counter(), time.process_time()
        for n in range(count):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO events (id, stream, category, revision, type, schema_version, data, metadata,"
                " recorded_at) VALUES (?, 'order-raw', 'order', ?, 'OrderPlaced', 1, ?, ?, ?)",
                (
                    str(uuid.uuid4()),
                    self.revision,
                    DATA.decode(),
                    METADATA.to_json().decode(),
                    "2024-01-01T00:00:00+00:00",
                ),
            )
            conn.execute("COMMIT")
            self.revision += 1
            if n % 50 == 49:
                advance(50)
        figure.cpu_seconds += time.process_time() - cpu
        figure.seconds += time.perf_counter() - started
        figure.count += count

    def close(self) -> None:
        self.conn.close()


def raw_load(path: Path, stream: str, repeat: int) -> float:
    conn = connect(str(path), writer=False)
    decode = msgspec.json.decode
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        rows = conn.execute(
            "SELECT data FROM events WHERE stream = ? ORDER BY revision", (stream,)
        ).fetchall()
        for (data,) in rows:
            decode(data)
        timings.append(time.perf_counter() - started)
    conn.close()
    return statistics.median(timings)


class EventsourcingApp:
    """The ``eventsourcing`` library's SQLite application (WAL, synchronous=FULL by default)."""

    def __init__(self, path: Path) -> None:
        from eventsourcing.application import Application
        from eventsourcing.domain import Aggregate, event

        class Order(Aggregate):
            @event("Created")
            def __init__(self) -> None:
                self.lines = 0

            @event("LineAdded")
            def add_line(self, sku: str, quantity: int, amount: int) -> None:
                self.lines += 1

        self.order_cls: type[Any] = Order
        self.app: Any = Application(
            env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": str(path)}
        )
        self.order = Order()
        self.app.save(self.order)

    def save(self, count: int, figure: Figure, advance: Callable[[int], None]) -> None:
        started = time.perf_counter()
        for n in range(count):
            self.order.add_line(sku="SKU-1", quantity=2, amount=1999)
            self.app.save(self.order)
            if n % 50 == 49:
                advance(50)
        figure.seconds += time.perf_counter() - started
        figure.count += count

    def load(self, length: int, repeat: int) -> float:
        order = self.order_cls()
        for _ in range(length - 1):
            order.add_line(sku="SKU-1", quantity=2, amount=1999)
        self.app.save(order)
        timings = []
        for _ in range(repeat):
            started = time.perf_counter()
            loaded = self.app.repository.get(order.id)
            timings.append(time.perf_counter() - started)
            assert loaded.lines == length - 1
        return statistics.median(timings)

    def close(self) -> None:
        self.app.close()


def cpu_note(ours: Figure, raw: Figure) -> str:
    """CPU per append beside raw sqlite3's: what a busy disk cannot blur."""
    return f"CPU {ours.cpu_per_op_us:.0f} us per append vs raw {raw.cpu_per_op_us:.0f} us"


# ---------------------------------------------------------------------- orderstream


class OneWriter:
    def __init__(self, store: SqliteEventStore) -> None:
        self.store = store
        self.expected: Expected = NO_STREAM

    async def append(self, count: int, figure: Figure, advance: Callable[[int], None]) -> None:
        started, cpu = time.perf_counter(), time.process_time()
        for n in range(count):
            t = time.perf_counter()
            result = await self.store.append("order-single", [new_event()], self.expected)
            figure.latencies.append(time.perf_counter() - t)
            self.expected = result.revision
            if n % 50 == 49:
                advance(50)
        figure.cpu_seconds += time.process_time() - cpu
        figure.seconds += time.perf_counter() - started
        figure.count += count


async def concurrent_writers(
    store: SqliteEventStore, count: int, writers: int, figure: Figure, advance: Callable[[int], None]
) -> float:
    """Returns appends per transaction (per fsync)."""
    per_writer = max(1, count // writers)

    async def writer(w: int) -> None:
        expected: Expected = NO_STREAM
        for _ in range(per_writer):
            t = time.perf_counter()
            result = await store.append(f"order-w{w}", [new_event()], expected)
            figure.latencies.append(time.perf_counter() - t)
            expected = result.revision
            advance(1)

    transactions = store.stats.transactions
    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    figure.seconds += time.perf_counter() - started
    figure.count += per_writer * writers
    return per_writer * writers / max(1, store.stats.transactions - transactions)


async def load_stream(store: SqliteEventStore, length: int, repeat: int) -> float:
    written = 0
    while written < length:
        size = min(1000, length - written)
        await store.append("order-long", [new_event() for _ in range(size)], ANY)
        written += size
    decode = msgspec.json.decode
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        events = await store.read_stream("order-long")
        for recorded in events:
            decode(recorded.data)
        timings.append(time.perf_counter() - started)
        assert len(events) == length
    return statistics.median(timings)


# ---------------------------------------------------------------------- main


@dataclass
class Row:
    what: str
    ours: str
    reference: str
    ratio: float
    better: str
    note: str = ""


async def measure(args: argparse.Namespace, folder: Path) -> list[Row]:
    events, writers, length, repeat = args.events, args.writers, args.stream_length, args.repeat
    chunk = max(1, events // ROUNDS)
    raw, single, many, es = Figure(), Figure(), Figure(), Figure()
    reference = RawSqlite(folder / "raw.db")
    eventsourcing: EventsourcingApp | None = None
    if not args.no_eventsourcing:
        try:
            eventsourcing = EventsourcingApp(folder / "eventsourcing.db")
        except ImportError:
            eventsourcing = None
    store = await SqliteEventStore.open(folder / "orderstream.db")
    columns = (TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns) as progress:

            def task(description: str, total: int) -> Callable[[int], None]:
                task_id = progress.add_task(description, total=total)
                return lambda n: progress.advance(task_id, n)

            advance_raw = task("1: raw sqlite3, 1 fsync per insert", chunk * ROUNDS)
            advance_single = task("1: orderstream, 1 writer", chunk * ROUNDS)
            advance_es = task("1: eventsourcing, 1 writer", chunk * ROUNDS) if eventsourcing else None
            writer = OneWriter(store)
            for _ in range(ROUNDS):  # interleaved, so that fsync drift hits every contender alike
                reference.insert(chunk, raw, advance_raw)
                await writer.append(chunk, single, advance_single)
                if eventsourcing is not None and advance_es is not None:
                    eventsourcing.save(chunk, es, advance_es)
            per_writer = max(1, events // writers)
            advance_many = task(f"2: orderstream, {writers} writers", per_writer * writers)
            per_fsync = await concurrent_writers(store, events, writers, many, advance_many)
            advance_load = task(f"3: load a {length}-event stream", 3)
            load = await load_stream(store, length, repeat)
            advance_load(1)
            await store.close()
            raw_load_seconds = raw_load(folder / "orderstream.db", "order-long", repeat)
            advance_load(1)
            es_load = eventsourcing.load(length, repeat) if eventsourcing else None
            advance_load(1)
    finally:
        await store.close()
        reference.close()
        if eventsourcing is not None:
            eventsourcing.close()

    def rate(figure: Figure) -> str:
        return f"{figure.rate:,.0f}/s"

    def latency(figure: Figure) -> str:
        return f"p50 {figure.percentile(0.5):.2f} ms, p99 {figure.percentile(0.99):.2f} ms"

    rows = [
        Row(
            "1 writer, 1 event per append", rate(single), f"{rate(raw)} raw", single.rate / raw.rate, "higher"
        )
    ]
    rows[-1].note = f"{latency(single)}; {cpu_note(single, raw)}"
    if eventsourcing is not None:
        rows.append(Row("", "", f"{rate(es)} eventsourcing", single.rate / es.rate, "higher"))
    rows.append(
        Row(
            f"{writers} writers, distinct streams",
            rate(many),
            f"{rate(raw)} raw",
            many.rate / raw.rate,
            "higher",
            f"{per_fsync:.1f} appends per fsync; {latency(many)}",
        )
    )
    rows.append(
        Row(
            f"load a {length}-event stream",
            f"{load * 1000:.1f} ms",
            f"{raw_load_seconds * 1000:.1f} ms raw",
            load / raw_load_seconds,
            "lower",
            "read_stream + decode every event vs SELECT data + decode",
        )
    )
    if es_load is not None:
        rows.append(Row("", "", f"{es_load * 1000:.1f} ms eventsourcing", load / es_load, "lower"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.eventstore_append", description=__doc__)
    parser.add_argument("--events", type=int, default=2000, help="appends for figures 1 and 2 (2000)")
    parser.add_argument("--writers", type=int, default=32, help="concurrent writers for figure 2 (32)")
    parser.add_argument(
        "--stream-length", type=int, default=10_000, help="events of the loaded stream (10000)"
    )
    parser.add_argument("--repeat", type=int, default=5, help="loads measured, median reported (5)")
    parser.add_argument("--no-eventsourcing", action="store_true", help="skip the eventsourcing reference")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="orderstream-bench-") as folder:
        rows = asyncio.run(measure(args, Path(folder)))
    console = Console(width=max(Console().width, 140))
    table = Table(
        title=f"SqliteEventStore (sqlite {sqlite3.sqlite_version}) beside references from the same run"
    )
    for name in ("measurement", "orderstream", "reference", "ratio", "better", "notes"):
        table.add_column(name, justify="right" if name in ("orderstream", "reference", "ratio") else "left")
    for row in rows:
        table.add_row(row.what, row.ours, row.reference, f"{row.ratio:.2f}x", row.better, row.note)
    console.print(table)
    console.print(f"ratio = orderstream / reference; total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
