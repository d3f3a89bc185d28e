"""Aggregate load benchmark: ``python -m bench.aggregate_load [--events N] [--orders N]``.

A product stream of N events (default 10,000: stock added, reserved, released,
committed; 90% of them keyed like the saga's steps) in a fresh
``SqliteEventStore``. Measured in one run, each beside the reference: the same
``CommandHandler`` without snapshots, which folds the whole stream.

1. ``load`` of the stream from its latest snapshot plus a 50-event tail, against
   a full fold.
2. A keyed ``add_stock`` (new key: load, idempotency check, decide, append),
   with snapshots against without. The snapshot writes the command starts run
   in the background and are waited for outside the timing (row 4 times them).
3. A keyed ``add_stock`` that replays a key used 5,000 events earlier (the
   store's idempotency record in both; the load differs).
4. Writing one snapshot (the state), and its size.

A hot product (``--orders``, default 100,000; 0 skips it), in a store of its
own: orders arriving ``--rate`` per second, each reserved and, about two seconds
later, committed or (``--released``) released, appended straight through
``SqliteEventStore.append`` 5,000 events at a time; a snapshot written through
``SnapshotStore.write`` 50 events before the end.

5. ``load`` of that product from its latest snapshot plus the 50-event tail,
   beside a raw ``SELECT data`` + ``msgspec`` decode of the whole stream
   (``bench.eventstore_append.raw_load``), interleaved round by round.
6. The size of the state in that snapshot, beside the same state plus the ids
   of the finished orders (what the previous design kept).
7. The size of the whole snapshot event, idempotency records included.

The contenders run interleaved, round by round; each figure is the median.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.eventstore_append import raw_load
from bench.figures import Figure
from orderstream.application.commands import CommandContext, CommandHandler, Loaded, request_digest
from orderstream.application.snapshots import (
    PendingSnapshot,
    SnapshotStore,
    snapshot_stream,
    state_schema_id,
)
from orderstream.application.use_cases import UseCases
from orderstream.domain import inventory
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.base import ANY, EventMetadata, IdempotencyClaim
from orderstream.eventstore.sqlite import SqliteEventStore

SKU = "SKU-POPULAR"
STREAM = inventory.stream_name(SKU)
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
TAIL = 50
PROGRESS_COLUMNS = (
    TextColumn("{task.description:<44}"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeElapsedColumn(),
)


def history(length: int, seed: int) -> list[tuple[Any, dict[str, Any]]]:
    """Events the decider could have produced, with saga-like keys on 90% of them."""
    rng = random.Random(seed)
    out: list[tuple[Any, dict[str, Any]]] = []
    held: dict[str, int] = {}
    on_hand = 0
    while len(out) < length:
        n = len(out)
        meta: dict[str, Any] = {"actor": "saga", "correlation_id": str(uuid.UUID(int=rng.getrandbits(128)))}
        if rng.random() < 0.9:
            meta["idempotency_key"] = f"order-fulfilment-{uuid.UUID(int=rng.getrandbits(128))}/step-{n}"
            meta["request_hash"] = f"{rng.getrandbits(128):032x}"
        if n == 0:
            out.append(
                (inventory.ProductRegistered(sku=SKU, name="Popular", price=Money(999, "EUR"), at=NOW), meta)
            )
        elif on_hand - sum(held.values()) < 10 or rng.random() < 0.1:
            on_hand += 100
            out.append((inventory.StockAdded(sku=SKU, quantity=100, at=NOW), meta))
        elif rng.random() < 0.55 or not held:
            order_id = str(uuid.UUID(int=rng.getrandbits(128)))
            held[order_id] = rng.randint(1, 3)
            out.append(
                (inventory.StockReserved(sku=SKU, order_id=order_id, quantity=held[order_id], at=NOW), meta)
            )
        else:
            order_id = rng.choice(list(held))
            quantity = held.pop(order_id)
            if rng.random() < 0.3:
                event: Any = inventory.StockReleased(
                    sku=SKU, order_id=order_id, quantity=quantity, reason="timeout", at=NOW
                )
            else:
                on_hand -= quantity
                event = inventory.StockCommitted(sku=SKU, order_id=order_id, quantity=quantity, at=NOW)
            out.append((event, meta))
    return out


async def append(
    store: SqliteEventStore, events: list[tuple[Any, dict[str, Any]]], advance: Callable[[int], None]
) -> None:
    for start in range(0, len(events), 500):
        batch = events[start : start + 500]
        claims = [  # the idempotency records the handler stores with keyed commands
            IdempotencyClaim(
                actor=m["actor"], key=m["idempotency_key"], request_hash=m.get("request_hash"), last=i
            )
            for i, (_, m) in enumerate(batch)
            if "idempotency_key" in m
        ]
        await store.append(
            STREAM,
            [registry.to_new_event(e, event_id=uuid.uuid4(), metadata=EventMetadata(**m)) for e, m in batch],
            ANY,
            idempotency=claims,
        )
        advance(len(batch))


async def timed(fn: Callable[[], Awaitable[Any]]) -> float:
    started = time.perf_counter()
    await fn()
    return time.perf_counter() - started


@dataclass
class Row:
    what: str
    ours: float
    reference: float
    note: str = ""


async def measure(args: argparse.Namespace, folder: Path) -> tuple[list[Row], str]:
    store = await SqliteEventStore.open(folder / "events.db")
    snapshots = SnapshotStore(store, every=100)
    snapped = CommandHandler(store, registry, snapshots=snapshots)
    full = CommandHandler(store, registry)
    rows: list[Row] = []
    try:
        with Progress(*PROGRESS_COLUMNS) as progress:

            def task(description: str, total: int) -> Callable[[int], None]:
                task_id = progress.add_task(description, total=total)
                return lambda n: progress.advance(task_id, n)

            events = history(args.events + TAIL, args.seed)
            await append(store, events[: args.events], task(f"append {args.events:,} events", args.events))
            # The first snapshot: what the first command after an upgrade writes in the background.
            loaded = await full.load(inventory.decider, STREAM)
            write_seconds = await timed(lambda: snapshots.write(_pending(loaded)))
            [snapshot_event] = await store.read_stream(snapshot_stream(STREAM), backwards=True, limit=1)
            size = len(snapshot_event.data)
            await append(store, events[args.events :], task(f"append a {TAIL}-event tail", TAIL))

            rounds = args.repeat
            advance = task("1: load, interleaved", rounds)
            ours, ref = [], []
            for _ in range(rounds):
                ref.append(await timed(lambda: full.load(inventory.decider, STREAM)))
                ours.append(await timed(lambda: snapped.load(inventory.decider, STREAM)))
                advance(1)
            check = await snapped.load(inventory.decider, STREAM)
            assert check.snapshot is not None
            assert check.state == (await full.load(inventory.decider, STREAM)).state
            fold = statistics.median(ref)
            rows.append(
                Row(
                    f"1. load a {args.events + TAIL:,}-event product stream",
                    statistics.median(ours),
                    statistics.median(ref),
                    f"snapshot at {check.snapshot.revision:,} + {len(check.events)} events vs full fold",
                )
            )

            advance = task("2: keyed add_stock, interleaved", rounds)
            ours, ref = [], []
            for n in range(rounds):
                ref.append(await timed(lambda: UseCases(full).add_stock(SKU, 1, _keyed(f"ref-{n}"))))  # noqa: B023
                ours.append(await timed(lambda: UseCases(snapped).add_stock(SKU, 1, _keyed(f"ours-{n}"))))  # noqa: B023
                await snapshots.drain()
                advance(1)
            rows.append(
                Row(
                    "2. keyed add_stock (new key)",
                    statistics.median(ours),
                    statistics.median(ref),
                    "load + key check + decide + append",
                )
            )

            old_meta = events[args.events - 5_000 if args.events > 5_000 else args.events // 2][1]
            old_key = old_meta.get("idempotency_key") or events[1][1]["idempotency_key"]
            digest = next(m["request_hash"] for _, m in events if m.get("idempotency_key") == old_key)
            context = CommandContext(actor="saga", idempotency_key=old_key, request_hash=digest)
            cmd = inventory.AddStock(sku=SKU, quantity=1, now=NOW)
            advance = task("3: keyed replay, interleaved", rounds)
            ours, ref = [], []
            for _ in range(rounds):
                ref.append(await timed(lambda: full.handle(inventory.decider, STREAM, cmd, context=context)))
                ours.append(
                    await timed(lambda: snapped.handle(inventory.decider, STREAM, cmd, context=context))
                )
                advance(1)
            replay = await snapped.handle(inventory.decider, STREAM, cmd, context=context)
            assert replay.replayed
            rows.append(
                Row(
                    "3. keyed replay of a key 5,000 events back",
                    statistics.median(ours),
                    statistics.median(ref),
                    "the store's idempotency record, with and without snapshots",
                )
            )
            rows.append(
                Row(
                    "4. write one snapshot (background)",
                    write_seconds,
                    fold,
                    f"{size / 1024:,.0f} KiB; reference: the full-fold load of 1",
                )
            )
    finally:
        await snapped.close()
        await store.close()
    return rows, f"{snapshots.stats.written} snapshots written, {snapshots.stats.failed} failed"


# ------------------------------------------------------------- a product with 100,000 orders

HOT_SKU = "SKU-HOT"
HOT_STREAM = inventory.stream_name(HOT_SKU)
SAGA_SECONDS = 2.0
"""How long a saga holds its reservation before committing or releasing it."""
APPEND_BATCH = 5_000


@dataclass
class Sales:
    """A hot product's history: the events and metadata the sagas would have appended."""

    events: list[tuple[Any, dict[str, Any]]]
    finished: list[str]
    """Ids of the orders committed or released (what the previous design kept)."""


def sales(orders: int, rate: float, released: float, seed: int) -> Sales:
    """``orders`` orders of one SKU arriving ``rate`` per second (exponential gaps),
    each reserved, then about ``SAGA_SECONDS`` later committed, or released (a
    ``released`` fraction; those of the last seconds are still in flight); stock
    topped up 1,000 at a time. In time order, keyed like the saga's steps."""
    rng = random.Random(seed)
    at = NOW
    out: list[tuple[Any, dict[str, Any]]] = []
    finishing: list[tuple[datetime, str, int]] = []  # heap of (when, order id, quantity)
    finished: list[str] = []
    available = 0

    def keyed(order_id: str, step: str) -> dict[str, Any]:
        return {"actor": "saga", "correlation_id": order_id, "idempotency_key": f"order-{order_id}/{step}"}

    def finish(until: datetime) -> None:
        nonlocal available
        while finishing and finishing[0][0] <= until:
            when, order_id, quantity = heapq.heappop(finishing)
            finished.append(order_id)
            if rng.random() < released:
                available += quantity
                event: Any = inventory.StockReleased(
                    sku=HOT_SKU, order_id=order_id, quantity=quantity, reason="payment declined", at=when
                )
                out.append((event, keyed(order_id, f"release-stock/{HOT_SKU}")))
            else:
                event = inventory.StockCommitted(sku=HOT_SKU, order_id=order_id, quantity=quantity, at=when)
                out.append((event, keyed(order_id, f"commit-stock/{HOT_SKU}")))

    price = Money(999, "EUR")
    out.append((inventory.ProductRegistered(sku=HOT_SKU, name="Hot", price=price, at=at), {"actor": "admin"}))
    for _ in range(orders):
        at += timedelta(seconds=rng.expovariate(rate))
        finish(at)
        if available < 10:
            available += 1_000
            out.append((inventory.StockAdded(sku=HOT_SKU, quantity=1_000, at=at), {"actor": "admin"}))
        order_id = str(uuid.UUID(int=rng.getrandbits(128)))
        quantity = rng.randint(1, 3)
        available -= quantity
        event = inventory.StockReserved(sku=HOT_SKU, order_id=order_id, quantity=quantity, at=at)
        out.append((event, keyed(order_id, f"reserve-stock/{HOT_SKU}")))
        heapq.heappush(
            finishing, (at + timedelta(seconds=SAGA_SECONDS * rng.uniform(0.5, 1.5)), order_id, quantity)
        )
    return Sales(out, finished)  # the last orders are still in flight


async def append_in_batches(
    store: SqliteEventStore, events: list[tuple[Any, dict[str, Any]]], advance: Callable[[int], None]
) -> None:
    for start in range(0, len(events), APPEND_BATCH):
        batch = events[start : start + APPEND_BATCH]
        await store.append(
            HOT_STREAM,
            [registry.to_new_event(e, event_id=uuid.uuid4(), metadata=EventMetadata(**m)) for e, m in batch],
            ANY,
        )
        advance(len(batch))


@dataclass
class HotRow:
    what: str
    ours: str
    reference: str
    ratio: str
    target: str
    note: str


async def measure_hot_product(args: argparse.Namespace, folder: Path) -> list[HotRow]:
    """Figures 5 and 6: a product with ``args.orders`` orders behind it."""
    with Progress(*PROGRESS_COLUMNS) as progress:

        def task(description: str, total: int) -> Callable[[int], None]:
            task_id = progress.add_task(description, total=total)
            return lambda n: progress.advance(task_id, n)

        return await _hot_product(args, folder, task)


async def _hot_product(
    args: argparse.Namespace, folder: Path, task: Callable[[str, int], Callable[[int], None]]
) -> list[HotRow]:
    path = folder / "hot.db"
    store = await SqliteEventStore.open(path)
    snapshots = SnapshotStore(store, every=100)
    snapped = CommandHandler(store, registry, snapshots=snapshots)
    full = CommandHandler(store, registry)
    try:
        history = sales(args.orders, args.rate, args.released, args.seed)
        body, tail = history.events[:-TAIL], history.events[-TAIL:]
        await append_in_batches(
            store, body, task(f"append {len(body):,} events of {args.orders:,} orders", len(body))
        )
        started = time.perf_counter()
        loaded = await full.load(inventory.decider, HOT_STREAM)
        fold_seconds = time.perf_counter() - started
        await snapshots.write(_pending(loaded, HOT_STREAM))
        [snapshot_event] = await store.read_stream(snapshot_stream(HOT_STREAM), backwards=True, limit=1)
        await append_in_batches(store, tail, task(f"append a {TAIL}-event tail", TAIL))

        ours, raw = Figure(), Figure()
        advance = task("5: load from snapshot vs raw, interleaved", args.repeat)
        for _ in range(args.repeat):
            raw.latencies.append(raw_load(path, HOT_STREAM, 1))
            ours.latencies.append(await timed(lambda: snapped.load(inventory.decider, HOT_STREAM)))
            advance(1)
        check = await snapped.load(inventory.decider, HOT_STREAM)
        assert check.snapshot is not None
        assert len(check.events) == TAIL
        assert check.state == (await full.load(inventory.decider, HOT_STREAM)).state
    finally:
        await snapped.close()
        await store.close()

    state = check.state
    state_size = len(msgspec.json.encode(snapshot_state(snapshot_event.data)))
    previous = state_size + len(msgspec.json.encode(history.finished))
    events = len(history.events)
    return [
        HotRow(
            f"5. load a product with {args.orders:,} orders ({events:,} events) from its latest snapshot",
            f"{ours.percentile(0.5):.2f} ms",
            f"{raw.percentile(0.5):.2f} ms",
            f"{ours.percentile(0.5) / raw.percentile(0.5):.4f}x",
            "<= 5 ms",
            f"snapshot + {TAIL}-event tail vs raw SELECT data + decode of the whole stream;"
            f" a full fold by the handler took {fold_seconds * 1000:,.0f} ms",
        ),
        HotRow(
            "6. that product's state in its snapshot",
            f"{state_size / 1024:.1f} KiB",
            f"{previous / 1024:,.0f} KiB",
            f"{state_size / previous:.4f}x",
            "< 16 KiB",
            f"{len(state.reservations)} reservations in flight, {len(state.released_at)} releases in the"
            f" {inventory.RELEASE_GUARD.seconds} s guard, {state.orders_committed:,} committed,"
            f" {state.orders_released:,} released; reference: that state plus the finished orders' ids,"
            " which the previous design kept",
        ),
        HotRow(
            "7. the whole snapshot event, as SnapshotStore writes it",
            f"{len(snapshot_event.data) / 1024:,.1f} KiB",
            f"{state_size / 1024:.1f} KiB",
            f"{len(snapshot_event.data) / state_size:.1f}x",
            "< 16 KiB",
            "the state and the snapshot's envelope (idempotency records live in their own table,"
            " not in snapshots); reference: the state alone",
        ),
    ]


def snapshot_state(data: bytes) -> msgspec.Raw:
    """The ``state`` part of a stored snapshot, as stored."""
    return msgspec.json.decode(data, type=_StateOnly).state


class _StateOnly(msgspec.Struct):
    state: msgspec.Raw


def _keyed(key: str) -> CommandContext:
    return CommandContext(actor="bench", idempotency_key=key, request_hash=request_digest({"quantity": 1}))


def _pending(loaded: Loaded[inventory.Product], stream: str = STREAM) -> PendingSnapshot[inventory.Product]:
    assert loaded.revision is not None
    assert loaded.position is not None
    return PendingSnapshot(
        stream=stream,
        state=loaded.state,
        schema=state_schema_id(inventory.Product),
        revision=loaded.revision,
        position=loaded.position,
        base=None,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.aggregate_load", description=__doc__)
    parser.add_argument("--events", type=int, default=10_000, help="events of the product stream (10000)")
    parser.add_argument("--repeat", type=int, default=15, help="rounds per figure, median reported (15)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--orders", type=int, default=100_000, help="orders behind the hot product; 0: skip (100000)"
    )
    parser.add_argument("--rate", type=float, default=10.0, help="the hot product's orders per second (10)")
    parser.add_argument("--released", type=float, default=0.2, help="fraction of its orders released (0.2)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    console = Console(width=max(Console().width, 140))
    with tempfile.TemporaryDirectory(prefix="orderstream-bench-") as folder:
        if args.events:
            rows, stats = asyncio.run(measure(args, Path(folder)))
            print_rows(console, rows, stats)
        if args.orders:
            print_hot_rows(console, asyncio.run(measure_hot_product(args, Path(folder))), args)
    console.print(f"total {time.perf_counter() - started:.1f} s")


def print_rows(console: Console, rows: list[Row], stats: str) -> None:
    table = Table(title="Aggregate load with snapshots (every 100) beside a full fold, same run, SQLite")
    for name in ("measurement", "snapshots", "full fold", "ratio", "notes"):
        table.add_column(name, justify="right" if name in ("snapshots", "full fold", "ratio") else "left")
    for row in rows:
        table.add_row(
            row.what,
            f"{row.ours * 1000:.2f} ms",
            f"{row.reference * 1000:.2f} ms",
            f"{row.ours / row.reference:.3f}x",
            row.note,
        )
    console.print(table)
    console.print(f"ratio = snapshots / full fold (lower is better); {stats}")


def print_hot_rows(console: Console, rows: list[HotRow], args: argparse.Namespace) -> None:
    title = (
        f"A hot product: {args.orders:,} orders at {args.rate:g}/s, {args.released:.0%} released,"
        " beside references from the same run, SQLite"
    )
    table = Table(title=title)
    for name in ("measurement", "ours", "reference", "ratio", "target", "notes"):
        table.add_column(
            name, justify="right" if name in ("ours", "reference", "ratio", "target") else "left"
        )
    for row in rows:
        table.add_row(row.what, row.ours, row.reference, row.ratio, row.target, row.note)
    console.print(table)
    console.print("ratio = ours / reference (lower is better); medians of --repeat rounds")


if __name__ == "__main__":
    main()
