"""Aggregate load benchmark: ``python -m bench.aggregate_load [--events N]``.

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

The contenders run interleaved, round by round; each figure is the median.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orderstream.application.commands import CommandContext, CommandHandler, Loaded, request_digest
from orderstream.application.snapshots import PendingSnapshot, SnapshotStore, snapshot_stream, state_schema_id
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
    columns = (TextColumn("{task.description:<36}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    rows: list[Row] = []
    try:
        with Progress(*columns) as progress:

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


def _keyed(key: str) -> CommandContext:
    return CommandContext(actor="bench", idempotency_key=key, request_hash=request_digest({"quantity": 1}))


def _pending(loaded: Loaded[inventory.Product]) -> PendingSnapshot[inventory.Product]:
    assert loaded.revision is not None
    assert loaded.position is not None
    return PendingSnapshot(
        stream=STREAM,
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
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="orderstream-bench-") as folder:
        rows, stats = asyncio.run(measure(args, Path(folder)))
    console = Console(width=max(Console().width, 140))
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
    total = time.perf_counter() - started
    console.print(f"ratio = snapshots / full fold (lower is better); {stats}; total {total:.1f} s")


if __name__ == "__main__":
    main()
