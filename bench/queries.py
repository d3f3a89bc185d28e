"""Queries on a big read model: ``python -m bench.queries [--orders N]``.

1. Bulk-loads N orders (default 1,000,000) into a SQLite read store: each order's
   events are folded by the ``orders`` projection itself and written through the
   read store's ``write`` API in batches, as a catching-up projection would (no HTTP,
   no event store: the point is the read side's size, not how it got there).
2. Starts ``orderstream api`` on that read store (no projection runner in it) and
   drives it with wrk (``/usr/bin/wrk``), 32 connections, on: a plain list, a
   full-text query with many matches, one with few, a status filter, and a list
   with the status facet.
3. Prints req/s, p50 and p99 of each beside references from the same run: the warm
   time of the same query's SQL on the database directly, the SQL the store ran for
   every list before (count + facet + full-document sort), and ``GET /health`` of the
   same server under the same wrk load (the HTTP floor on this machine).

The data: a city per order out of eight (``london`` matches 1 in 8 orders), a
customer out of 20,000, one order in 100,000 shipped to ``Zanzibar`` (the "few
matches" query), statuses spread over placed / cancelled / shipped / rejected.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec

from bench import auth as bench_auth
from orderstream.readstore.base import CollectionSchema, Document, Query, Upsert
from orderstream.readstore.sqlite import PrefixCache, SqliteReadStore, _QueryPlan, _Table
from projections import order_summary

CITIES = ("London", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Lisbon")
RARE_CITY = "Zanzibar"
RARE_EVERY = 100_000
CUSTOMERS = 20_000
BATCH = 2_000
START = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class _Event:
    """An event as the projection sees it (``projections.base.ProjectedEvent``)."""

    type: str
    stream: str
    revision: int
    position: int
    data: Mapping[str, Any]
    recorded_at_iso: str


def _events(n: int, rng: random.Random, position: int) -> list[_Event]:
    """Order ``n``'s events: placed, then for some orders a terminal event."""
    order_id = f"o{n:08d}"
    stream = f"order-{order_id}"
    at = START + timedelta(seconds=n * 7 + rng.randrange(5))
    city = RARE_CITY if n % RARE_EVERY == RARE_EVERY // 2 else CITIES[n % len(CITIES)]
    sku = f"SKU-{rng.randrange(500)}"
    quantity = rng.randrange(1, 5)
    amount = 100 * rng.randrange(1, 90)
    price = {"amount": amount, "currency": "EUR"}
    placed = {
        "customer_id": f"c{rng.randrange(CUSTOMERS):05d}",
        "lines": [{"sku": sku, "quantity": quantity, "unit_price": price}],
        "total": {"amount": amount * quantity, "currency": "EUR"},
        "shipping_address": {
            "name": f"Customer {n}",
            "line1": "1 Main Street",
            "city": city,
            "postal_code": f"{10000 + n % 90000}",
            "country": "GB",
        },
        "placed_at": at.isoformat(),
    }
    events = [_Event("OrderPlaced", stream, 0, position, placed, at.isoformat())]
    later = (at + timedelta(minutes=5)).isoformat()
    kind = rng.random()
    if kind < 0.2:
        events.append(
            _Event("OrderCancelled", stream, 1, position + 1, {"reason": "changed mind", "at": later}, later)
        )
    elif kind < 0.5:
        events.append(
            _Event("OrderShipped", stream, 1, position + 1, {"tracking_number": "T1", "at": later}, later)
        )
    elif kind < 0.55:
        events.append(
            _Event("OrderRejected", stream, 1, position + 1, {"reason": "out of stock", "at": later}, later)
        )
    return events


def _fold(events: Sequence[_Event]) -> tuple[Document, int]:
    doc: Document | None = None
    for event in events:
        doc = order_summary.projection.fold(doc, event)
    assert doc is not None
    return doc, events[-1].revision


async def load(path: Path, orders: int, *, seed: int = 7) -> float:
    """Fold and write ``orders`` orders into the read store at ``path``; returns seconds."""
    rng = random.Random(seed)
    store = await SqliteReadStore.open(path)
    started = time.perf_counter()
    try:
        await store.ensure_collection(order_summary.SCHEMA)
        position = 0
        for first in range(0, orders, BATCH):
            ops = []
            for n in range(first, min(orders, first + BATCH)):
                events = _events(n, rng, position)
                position += len(events)
                doc, version = _fold(events)
                ops.append(Upsert(id=doc["id"], version=version, document=doc))
            await store.write(order_summary.NAME, ops)
            done = first + len(ops)
            if done % 50_000 < BATCH or done == orders:
                rate = done / (time.perf_counter() - started)
                print(f"  loaded {done:,}/{orders:,} orders ({rate:,.0f}/s)", flush=True)
    finally:
        await store.close()
    return time.perf_counter() - started


# ----------------------------------------------------------------------- the queries


@dataclass(frozen=True)
class Case:
    name: str
    params: dict[str, str]
    query: Query
    """The same query as the route sends to the read store."""


CASES = (
    Case("list limit=20", {"limit": "20"}, Query(limit=20, sort=order_summary.SCHEMA.default_sort)),
    Case(
        "q=london (1 in 8 match)",
        {"q": "london", "limit": "20"},
        Query(text="london", limit=20, sort=order_summary.SCHEMA.default_sort),
    ),
    Case(
        "q=zanzibar (few match)",
        {"q": "zanzibar", "limit": "20"},
        Query(text="zanzibar", limit=20, sort=order_summary.SCHEMA.default_sort),
    ),
    Case(
        "status=rejected",
        {"status": "rejected", "limit": "20"},
        Query(filters={"status": ["rejected"]}, limit=20, sort=order_summary.SCHEMA.default_sort),
    ),
    Case(
        "customer_id=c00042",
        {"customer_id": "c00042", "limit": "20"},
        Query(filters={"customer_id": "c00042"}, limit=20, sort=order_summary.SCHEMA.default_sort),
    ),
    Case(
        "facets=status, q=zanzibar",
        {"q": "zanzibar", "facets": "status", "limit": "20"},
        Query(text="zanzibar", limit=20, facets=("status",), sort=order_summary.SCHEMA.default_sort),
    ),
    Case(
        "facets=status, status=placed",
        {"status": "placed", "facets": "status", "limit": "20"},
        Query(
            filters={"status": ["placed"]},
            limit=20,
            facets=("status",),
            sort=order_summary.SCHEMA.default_sort,
        ),
    ),
    Case(
        "facets=status (all orders)",
        {"facets": "status", "limit": "20"},
        Query(limit=20, facets=("status",), sort=order_summary.SCHEMA.default_sort),
    ),
)


def _old_sql(conn: sqlite3.Connection, physical: str, query: Query) -> None:
    """What the read store ran for every list before this change: a count, the status
    facet, and the page sorted with its documents (``ORDER BY ... id ASC`` against a
    ``DESC`` sort, so no index gives the order)."""
    where: list[str] = ["doc IS NOT NULL"]
    params: list[object] = []
    for field, value in query.filters.items():
        values = value if isinstance(value, list) else [value]
        where.append(f'"f_{field}" IN ({", ".join("?" for _ in values)})')
        params.extend(values)
    if query.text:
        where.append(f'rowid IN (SELECT rowid FROM "{physical}__fts" WHERE "{physical}__fts" MATCH ?)')
        params.append(f'"{query.text}"*')
    clause = " AND ".join(where)
    conn.execute(f'SELECT count(*) FROM "{physical}" WHERE {clause}', params).fetchall()
    conn.execute(
        f'SELECT f_status, count(*) AS n FROM "{physical}" WHERE {clause} AND f_status IS NOT NULL '
        "GROUP BY f_status ORDER BY n DESC, f_status LIMIT 100",
        params,
    ).fetchall()
    conn.execute(
        f'SELECT doc, f_placed_at, id FROM "{physical}" WHERE {clause} '
        "ORDER BY f_placed_at DESC NULLS LAST, id ASC NULLS LAST LIMIT 21",
        params,
    ).fetchall()


def _median_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm the page cache
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def raw_times(path: Path, rounds: int) -> dict[str, tuple[float, float]]:
    """Per case: (the store's SQL for the query now, the SQL it ran before), warm
    median ms on one connection, no HTTP."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    physical = conn.execute("SELECT physical FROM aliases WHERE collection = 'orders'").fetchone()[0]
    row = conn.execute("SELECT schema FROM physicals WHERE physical = ?", (physical,)).fetchone()
    table = _Table(physical, "orders", msgspec.json.decode(row[0], type=CollectionSchema))
    out = {}
    prefixes: PrefixCache = {}  # as the store keeps it
    for case in CASES:
        now = _median_ms(lambda c=case: _QueryPlan(table, c.query, prefixes).run(conn), rounds)  # type: ignore[misc]
        before = _median_ms(lambda c=case: _old_sql(conn, physical, c.query), max(1, rounds // 5))  # type: ignore[misc]
        out[case.name] = (now, before)
    conn.close()
    return out


# --------------------------------------------------------------------------- HTTP


_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNIT[unit]


def wrk(url: str, *, seconds: int, connections: int) -> tuple[float, float, float, int]:
    """req/s, p50 ms, p99 ms and non-2xx count of ``wrk --latency`` on ``url``."""
    out = subprocess.run(
        ["/usr/bin/wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", *_auth_option(url), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rate, p50, p99, int(bad.group(1)) if bad else 0


def _auth_option(url: str) -> list[str]:
    value = bench_auth.authorization(url)
    return ["-H", f"Authorization: {value}"] if value else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_api(path: Path, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``orderstream api`` on the read store at ``path`` (its own event store)."""
    port = _free_port()
    env = {**os.environ, "ORDERSTREAM_READ_STORE": f"sqlite:///{path.resolve()}"}
    process = subprocess.Popen(
        [sys.executable, "-m", "orderstream.cli", "api", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=data_dir,
    )
    base = f"http://127.0.0.1:{port}"
    bench_auth.register(base, data_dir / "data")  # the api's default data dir, under its cwd
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            probe = urllib.request.Request(f"{base}/orders?limit=1", headers=bench_auth.headers(base))
            with urllib.request.urlopen(probe, timeout=5) as answer:
                if answer.status == 200:
                    return process, base
        except OSError:
            time.sleep(0.5)
    process.terminate()
    raise RuntimeError("orderstream api did not answer within 60 s")


def _count(path: Path) -> int:
    if not path.exists():
        return 0
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        physical = conn.execute("SELECT physical FROM aliases WHERE collection = 'orders'").fetchone()
        return (
            0
            if physical is None
            else int(conn.execute(f'SELECT max(rowid) FROM "{physical[0]}"').fetchone()[0])
        )
    except sqlite3.Error:
        return 0
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.queries", description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=1_000_000, help="orders in the read store")
    parser.add_argument("--db", type=Path, help="keep the read store here (reused if it holds --orders)")
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per query")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=50, help="rounds of each raw SQL timing")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-queries-") as tmp:
        path = args.db or Path(tmp) / "read.db"
        if _count(path) == args.orders:
            print(f"reusing {path} ({args.orders:,} orders)", flush=True)
        else:
            for stale in path.parent.glob(f"{path.name}*"):
                stale.unlink()
            print(f"bulk-loading {args.orders:,} orders into {path} ...", flush=True)
            seconds = asyncio.run(load(path, args.orders))
            print(f"loaded in {seconds:.0f} s ({args.orders / seconds:,.0f} orders/s)", flush=True)

        print("raw SQL, warm, one connection ...", flush=True)
        raw = raw_times(path, args.rounds)
        print("starting orderstream api (no projection runner) ...", flush=True)
        process, base = start_api(path, Path(tmp))
        rows = []
        try:
            print(f"wrk {args.connections} connections, {args.seconds} s: GET /health (reference) ...")
            floor = wrk(f"{base}/health", seconds=args.seconds, connections=args.connections)
            for case in CASES:
                url = f"{base}/orders?{urllib.parse.urlencode(case.params)}"
                print(f"wrk {args.connections} connections, {args.seconds} s: {case.name} ...", flush=True)
                rows.append((case, wrk(url, seconds=args.seconds, connections=args.connections)))
        finally:
            process.terminate()
            process.wait(30)

    print()
    print(f"{args.orders:,} orders, SQLite read store, wrk -c{args.connections} on orderstream api")
    header = (
        f"{'query':<28} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}"
        f" {'store SQL ms':>13} {'before SQL ms':>14}"
    )
    print(header)
    rate, p50, p99, bad = floor
    print(f"{'GET /health (HTTP floor)':<28} {rate:>8.0f} {p50:>8.1f} {p99:>8.1f} {bad:>8d}")
    for case, (rate, p50, p99, bad) in rows:
        now, before = raw[case.name]
        print(f"{case.name:<28} {rate:>8.0f} {p50:>8.1f} {p99:>8.1f} {bad:>8d} {now:>13.2f} {before:>14.1f}")
    print(
        "store SQL: this query through the read store's query plan (SQL + decode) on one "
        "connection, no HTTP;\nGET /health: the same server's cheapest route, the most any route can do here;"
        "\nbefore SQL: the count + status facet + full-document sort the "
        "store ran for every list before (the reference)."
    )


if __name__ == "__main__":
    main()
