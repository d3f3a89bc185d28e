"""Queries on a big read model: ``python -m bench.queries [--orders N] [--read-store sqlite|es]``.

1. Bulk-loads N orders (default 1,000,000) into the read store (SQLite, or with
   ``--read-store es`` Elasticsearch under a fresh index prefix, deleted at the end):
   each order's events are folded by the ``orders`` projection itself and written
   through the read store's bulk ``write`` API in batches, as a catching-up projection
   would (no HTTP, no event store: the point is the read side's size, not how it got there).
2. Starts ``orderstream api`` on that read store (no projection runner in it) and
   drives it with wrk, 32 connections, on: a plain list, a full-text query with many
   matches, one with few, a status filter, a customer filter and lists with the status facet.
3. Prints req/s, p50 and p99 of each beside references from the same run:
   ``GET /health`` of the same server under the same wrk load (the HTTP floor on this
   machine), and per store
   - SQLite: the warm time of the same query's SQL on the database directly, and the SQL
     the store ran for every list before (count + facet + full-document sort);
   - Elasticsearch: the very request the read store sends for that query (recorded from
     the store), sent straight to the node's ``_search`` by wrk at the same connections,
     i.e. what the API adds on top of the store; and the node's own ``took``.

``--db DIR/read.db`` keeps the loaded read store and reuses it when it holds ``--orders``
orders (1,000,000 take ~4 minutes to load). ``--src /work/main/src`` (repeatable) also
starts ``orderstream api`` from another checkout and runs every case on each server in
turn: before and after in one sitting. ``--cpu`` measures instead the CPU per request
inside the app (its ASGI callable driven by 32 tasks, no server or socket: what a busy,
shared machine does to wrk's figures stays out), this checkout beside each ``--src`` in
interleaved processes, and the garbage collector's longest pause; on SQLite it needs
``--db``, with ``--read-store es`` it loads ``--orders`` under a fresh prefix.

The data: a city per order out of eight (``london`` matches 1 in 8 orders), a
customer out of 20,000, one order in 100,000 shipped to ``Zanzibar`` (the "few
matches" query), statuses spread over placed / cancelled / shipped / rejected.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import os
import random
import re
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import msgspec
from elasticsearch import AsyncElasticsearch, NotFoundError

from bench import auth as bench_auth
from orderstream.api.schemas import OrderView
from orderstream.readstore.base import CollectionSchema, Document, Query, ReadStore, Upsert
from orderstream.readstore.elasticsearch import ElasticsearchReadStore
from orderstream.readstore.sqlite import SqliteReadStore
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


async def load(store: ReadStore, orders: int, *, seed: int = 7) -> float:
    """Fold ``orders`` orders and write them through ``store``'s bulk ``write`` in
    batches of ``BATCH``; returns seconds. Prints progress every 5% (and every 50,000)."""
    rng = random.Random(seed)
    started = time.perf_counter()
    await store.ensure_collection(order_summary.SCHEMA)
    step = max(BATCH, min(50_000, orders // 20))
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
        if done % step < BATCH or done == orders:
            rate = done / (time.perf_counter() - started)
            print(f"  loaded {done:,}/{orders:,} orders ({rate:,.0f}/s)", flush=True)
    return time.perf_counter() - started


async def load_sqlite(path: Path, orders: int) -> float:
    store = await SqliteReadStore.open(path)
    try:
        return await load(store, orders)
    finally:
        await store.close()


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
    # Here, not at the top: a --cpu child imports this module from another checkout's src.
    from orderstream.readstore.sqlite import FewCache, PrefixCache, _QueryPlan, _Table

    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
    physical = conn.execute("SELECT physical FROM aliases WHERE collection = 'orders'").fetchone()[0]
    row = conn.execute("SELECT schema FROM physicals WHERE physical = ?", (physical,)).fetchone()
    table = _Table(physical, "orders", msgspec.json.decode(row[0], type=CollectionSchema))
    out = {}
    prefixes: PrefixCache = {}  # as the store keeps them
    few: FewCache = {}
    for case in CASES:
        plan = functools.partial(_QueryPlan, table, case.query, prefixes, few)
        now = _median_ms(lambda p=plan: p().run(conn, OrderView), rounds)  # type: ignore[misc]
        before = _median_ms(lambda c=case: _old_sql(conn, physical, c.query), max(1, rounds // 5))  # type: ignore[misc]
        out[case.name] = (now, before)
    conn.close()
    return out


# ------------------------------------------------------------------ Elasticsearch


class _RecordingClient:
    """Passes every call on to the real client and keeps the arguments of each ``search``:
    the request the read store sends for a query, to replay it straight to ``_search``."""

    def __init__(self, client: AsyncElasticsearch) -> None:
        self._client = client
        self.searches: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def options(self, **_options: Any) -> _RecordingClient:
        """The store's reads go through ``client.options(request_timeout=...)``: still us."""
        return self

    async def search(self, **params: Any) -> Any:
        self.searches.append(params)
        return await self._client.search(**params)


@dataclass(frozen=True)
class EsSearch:
    """One case's request as the read store sends it, and the node's own time for it."""

    url: str
    """``{node}/{index}/_search``"""
    body: Path
    """The JSON body, for ``bench/wrk/search.lua``."""
    took_ms: float
    """Median ``took`` the node reports, warm."""


def es_reachable(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


async def load_es(url: str, prefix: str, orders: int) -> float:
    store = await ElasticsearchReadStore.open(url, prefix=prefix, read_timeout=120)
    try:
        seconds = await load(store, orders)
        await store.refresh(order_summary.NAME)
        return seconds
    finally:
        await store.close()


async def es_searches(url: str, prefix: str, folder: Path, rounds: int) -> dict[str, EsSearch]:
    """Per case: the ``_search`` request the store sends (recorded while it answers the
    case's query) and the median ``took`` of ``rounds`` warm repeats of it."""
    client = AsyncElasticsearch(url, request_timeout=60)
    recorder = _RecordingClient(client)
    store = ElasticsearchReadStore(cast("AsyncElasticsearch", recorder), prefix)
    out = {}
    try:
        for i, case in enumerate(CASES):
            await store.query(order_summary.NAME, case.query)
            params = dict(recorder.searches[-1])
            index = params.pop("index")
            body = folder / f"search-{i}.json"
            body.write_bytes(msgspec.json.encode(params))
            took = [(await client.search(index=index, **params))["took"] for _ in range(rounds)]
            out[case.name] = EsSearch(f"{url.rstrip('/')}/{index}/_search", body, statistics.median(took))
    finally:
        await client.close()
    return out


async def delete_es(url: str, prefix: str) -> None:
    """Every index and index template under ``prefix``."""
    client = AsyncElasticsearch(url, request_timeout=60)
    try:
        indices = await client.indices.get(index=f"{prefix}*", expand_wildcards="all")
        for index in indices.body:
            await client.indices.delete(index=index, ignore_unavailable=True)
        templates = await client.indices.get_index_template(name=f"{prefix}*")
        for template in templates["index_templates"]:
            await client.indices.delete_index_template(name=template["name"])
    except NotFoundError:
        pass
    finally:
        await client.close()


# --------------------------------------------------------------------------- HTTP


_UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNIT[unit]


WRK_SCRIPTS = Path(__file__).resolve().parent / "wrk"

Result = tuple[float, float, float, int]
"""req/s, p50 ms, p99 ms, non-2xx answers"""


def wrk(
    url: str, *, seconds: int, connections: int, script: str | None = None, script_args: Sequence[str] = ()
) -> Result:
    """req/s, p50 ms, p99 ms and non-2xx count of ``wrk --latency`` on ``url`` (with a
    script of ``bench/wrk`` and its arguments, if given)."""
    command = [
        shutil.which("wrk") or "/usr/bin/wrk",
        "-t2",
        f"-c{connections}",
        f"-d{seconds}s",
        "--latency",
        *_auth_option(url),
    ]
    if script is not None:
        command += ["-s", str(WRK_SCRIPTS / script)]
    command += [url, *(["--", *script_args] if script_args else [])]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
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


def start_api(read_store: str, data_dir: Path, src: str | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """``orderstream api`` on the read store at URL ``read_store`` (its own event store),
    from another checkout's ``src`` if given."""
    port = _free_port()
    env = {**os.environ, "ORDERSTREAM_READ_STORE": read_store}
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
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


def run_sqlite(args: argparse.Namespace, tmp: Path) -> None:
    path = args.db or tmp / "read.db"
    if _count(path) == args.orders:
        print(f"reusing {path} ({args.orders:,} orders)", flush=True)
    else:
        for stale in path.parent.glob(f"{path.name}*"):
            stale.unlink()
        print(f"bulk-loading {args.orders:,} orders into {path} ...", flush=True)
        seconds = asyncio.run(load_sqlite(path, args.orders))
        print(f"loaded in {seconds:.0f} s ({args.orders / seconds:,.0f} orders/s)", flush=True)

    print("raw SQL, warm, one connection ...", flush=True)
    raw = raw_times(path, args.rounds)
    contenders: list[tuple[str, str | None]] = [("", None), *((f" [{src}]", src) for src in args.src)]
    print(f"starting orderstream api (no projection runner) x{len(contenders)} ...", flush=True)
    servers: list[tuple[str, subprocess.Popen[bytes], str]] = []
    rows: list[tuple[str, Case | None, Result]] = []
    try:
        for i, (label, src) in enumerate(contenders):
            folder = tmp / f"api-{i}"
            folder.mkdir()
            servers.append((label, *start_api(f"sqlite:///{path.resolve()}", folder, src)))
        for case in [None, *CASES]:  # None: GET /health, the reference
            for label, _, base in servers:  # each case on each server in turn: the same sitting
                query = "" if case is None else urllib.parse.urlencode(case.params)
                url = f"{base}/health" if case is None else f"{base}/orders?{query}"
                what = "GET /health (reference)" if case is None else case.name
                print(f"wrk {args.connections} connections, {args.seconds} s: {what}{label} ...", flush=True)
                rows.append((label, case, wrk(url, seconds=args.seconds, connections=args.connections)))
    finally:
        for _, process, _ in servers:
            process.terminate()
            process.wait(30)

    print()
    print(f"{args.orders:,} orders, SQLite read store, wrk -c{args.connections} on orderstream api")
    header = (
        f"{'query':<28} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}"
        f" {'store SQL ms':>13} {'before SQL ms':>14}"
    )
    print(header)
    for label, case, (rate, p50, p99, bad) in rows:
        if case is None:
            print(f"{'GET /health (HTTP floor)' + label:<28} {rate:>8.0f} {p50:>8.1f} {p99:>8.1f} {bad:>8d}")
            continue
        now, before = raw[case.name]
        sql = f" {now:>13.2f} {before:>14.1f}" if not label else ""
        print(f"{case.name + label:<28} {rate:>8.0f} {p50:>8.1f} {p99:>8.1f} {bad:>8d}{sql}")
    print(
        "store SQL: this query through the read store's query plan (SQL + decoding the page into the "
        "API's OrderView) on one "
        "connection, no HTTP;\nGET /health: the same server's cheapest route, the most any route can do here;"
        "\nbefore SQL: the count + status facet + full-document sort the "
        "store ran for every list before (the reference)."
    )


def run_es(args: argparse.Namespace, tmp: Path) -> None:
    url = args.es_url
    if not es_reachable(url):
        raise SystemExit(
            f"no Elasticsearch node answers at {url} (start one: infra/elasticsearch/dev-node.sh start)"
        )
    prefix = f"bench-queries-{uuid.uuid4().hex[:8]}-"
    try:
        print(
            f"bulk-loading {args.orders:,} orders into Elasticsearch {url}, prefix {prefix} ...", flush=True
        )
        seconds = asyncio.run(load_es(url, prefix, args.orders))
        print(f"loaded in {seconds:.0f} s ({args.orders / seconds:,.0f} orders/s)", flush=True)
        print("recording the store's _search requests, warm took ...", flush=True)
        searches = asyncio.run(es_searches(url, prefix, tmp, args.rounds))
        print("starting orderstream api (no projection runner) ...", flush=True)
        process, base = start_api(f"{url}?prefix={prefix}", tmp)
        rows = []
        try:
            print(f"wrk {args.connections} connections, {args.seconds} s: GET /health (reference) ...")
            floor = wrk(f"{base}/health", seconds=args.seconds, connections=args.connections)
            for case in CASES:
                search = searches[case.name]
                url_api = f"{base}/orders?{urllib.parse.urlencode(case.params)}"
                print(
                    f"wrk {args.connections} connections, {args.seconds} s: {case.name}, API then _search ..."
                )
                api = wrk(url_api, seconds=args.seconds, connections=args.connections)
                direct = wrk(
                    search.url,
                    seconds=args.seconds,
                    connections=args.connections,
                    script="search.lua",
                    script_args=[str(search.body)],
                )
                rows.append((case, api, direct, search.took_ms))
        finally:
            process.terminate()
            process.wait(30)
    finally:
        asyncio.run(delete_es(url, prefix))
        print(f"deleted the {prefix}* indices and templates", flush=True)

    print()
    print(f"{args.orders:,} orders, Elasticsearch read store, wrk -c{args.connections} on orderstream api")
    print(
        f"{'query':<28} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8}"
        f" {'_search req/s':>14} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'took ms':>8}"
    )
    rate, p50, p99, bad = floor
    print(f"{'GET /health (HTTP floor)':<28} {rate:>8.0f} {p50:>8.1f} {p99:>8.1f} {bad:>8d}")
    for case, (rate, p50, p99, bad), (d_rate, d_p50, d_p99, d_bad), took in rows:
        print(
            f"{case.name:<28} {rate:>8.0f} {p50:>8.1f} {p99:>8.1f} {bad:>8d}"
            f" {d_rate:>14.0f} {d_p50:>8.1f} {d_p99:>8.1f} {d_bad:>8d} {took:>8.1f}"
        )
    print(
        "_search: the request the read store sends for this query, straight to the node by wrk "
        "(same connections);\ntook: the node's own median time for it, warm, one at a time; "
        "GET /health: the API's cheapest route."
    )


# ------------------------------------------------------------ CPU per request, in process


async def _cpu_per_request(
    app: Any, path: str, params: Mapping[str, str], requests: int, auth: list[tuple[bytes, bytes]]
) -> float:
    """CPU seconds (every thread of the process: event loop and read-store readers) per
    ``GET path?params`` of ``requests`` sent by 32 tasks straight to the ASGI callable."""
    from bench.api_cpu import CONCURRENCY, call

    query_string = urllib.parse.urlencode(params).encode()
    failures: list[int] = []

    async def worker(first: int) -> None:
        for _ in range(first, requests, CONCURRENCY):
            status = await call(app, "GET", path, b"", auth, query_string)
            if status >= 300:
                failures.append(status)

    started = time.process_time()
    await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    spent = time.process_time() - started
    if failures:
        raise RuntimeError(f"{len(failures)} of GET {path}?{query_string.decode()} failed: {failures[:5]}")
    return spent / requests


GC_LONGEST = "longest GC pause (ms)"
GC_PER_REQUEST = "GC time per request (us)"


async def _cpu_child(read_store: str, requests: int) -> dict[str, float]:
    """Per case (and ``GET /health``): CPU per request of the app of whichever
    ``orderstream`` this process imports, on the read store at URL ``read_store``; and
    the garbage collector's pauses over all of them (a pause holds the GIL, so every
    request in flight waits it out: it lands in the p99, not in a mean)."""
    from bench.api_cpu import admin_authorization
    from orderstream.api.app import create_app
    from orderstream.bootstrap import build
    from orderstream.config import Settings

    with tempfile.TemporaryDirectory(prefix="bench-queries-cpu-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data", read_store_url=read_store)
        container = await build(settings)
        try:
            app = create_app(container, extra_route_handlers=(), background=())
            auth = admin_authorization(settings)
            from orderstream import cli

            freeze = getattr(cli, "freeze_start_up_heap", None)  # as `orderstream api` does (where it does)
            if freeze is not None:
                freeze()
            out = {}
            pauses: list[float] = []
            started: list[float] = []

            def on_collection(phase: str, _info: dict[str, Any]) -> None:
                if phase == "start":
                    started[:] = [time.perf_counter()]
                elif started:
                    pauses.append(time.perf_counter() - started[0])

            gc.callbacks.append(on_collection)
            for name, path, params in [
                ("GET /health", "/health", {}),
                *((case.name, "/orders", case.params) for case in CASES),
            ]:
                await _cpu_per_request(app, path, params, max(64, requests // 10), auth)  # warm
                out[name] = await _cpu_per_request(app, path, params, requests, auth)
            gc.callbacks.remove(on_collection)
            out[GC_LONGEST] = max(pauses, default=0.0) * 1e3
            out[GC_PER_REQUEST] = sum(pauses) / (requests * (len(CASES) + 1)) * 1e6
            return out
        finally:
            await container.close()


def run_cpu(args: argparse.Namespace) -> None:
    """``--cpu``: CPU per request in process, this checkout beside each ``--src``
    checkout (e.g. ``/work/main/src``), each round of each in its own process, interleaved.
    SQLite: on ``--db``; Elasticsearch: on ``--orders`` loaded under a fresh prefix."""
    if args.read_store == "es":
        prefix = f"bench-queries-{uuid.uuid4().hex[:8]}-"
        try:
            print(f"bulk-loading {args.orders:,} orders into Elasticsearch, prefix {prefix} ...", flush=True)
            asyncio.run(load_es(args.es_url, prefix, args.orders))
            _run_cpu(args, f"{args.es_url}?prefix={prefix}", "Elasticsearch")
        finally:
            asyncio.run(delete_es(args.es_url, prefix))
        return
    if args.db is None or _count(args.db) != args.orders:
        raise SystemExit(
            f"--cpu needs --db holding --orders ({args.orders:,}) orders: run without --cpu first"
        )
    _run_cpu(args, f"sqlite:///{args.db.resolve()}", "SQLite")


def _run_cpu(args: argparse.Namespace, read_store: str, store_name: str) -> None:
    contenders: list[tuple[str, str | None]] = [("this checkout", None), *((src, src) for src in args.src)]
    results: dict[str, list[dict[str, float]]] = {label: [] for label, _ in contenders}
    for round_ in range(args.rounds_cpu):
        for label, src in contenders:
            env = dict(os.environ)
            if src is not None:
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
            argv = [sys.executable, "-m", "bench.queries", "--cpu-child", read_store]
            argv += ["--requests", str(args.requests)]
            done = subprocess.run(
                argv, cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True
            )
            if done.returncode != 0:
                raise RuntimeError(f"{label}: {done.stderr[-3000:]}")
            figures = msgspec.json.decode(done.stdout.strip().splitlines()[-1], type=dict[str, float])
            results[label].append(figures)
            print(
                f"round {round_ + 1}: {label}: list limit=20 {figures[CASES[0].name] * 1e6:.0f} us",
                flush=True,
            )

    def median_us(label: str, name: str) -> float:
        return statistics.median(r[name] for r in results[label]) * 1e6

    print()
    print(
        f"CPU per request in process, {args.orders:,} orders, {store_name}, 32 tasks, "
        f"{args.requests} requests per case, median of {args.rounds_cpu} rounds (us):"
    )
    print(f"{'query':<28}" + "".join(f" {label[-24:]:>24}" for label, _ in contenders))
    for name in ["GET /health", *(case.name for case in CASES)]:
        row = f"{name:<28}" + "".join(f" {median_us(label, name):>24.0f}" for label, _ in contenders)
        if len(contenders) > 1:
            row += f"  {median_us(contenders[1][0], name) / median_us(contenders[0][0], name):.2f}x"
        print(row)
    for name in (GC_LONGEST, GC_PER_REQUEST):
        row = f"{name:<28}" + "".join(
            f" {statistics.median(r[name] for r in results[label]):>24.1f}" for label, _ in contenders
        )
        print(row)
    if len(contenders) > 1:
        print(f"ratio: {contenders[1][0]}'s CPU per request / this checkout's (above 1: this one is cheaper)")
    print(
        "GC: wall time of the garbage collector's passes over all the cases (median over rounds); "
        "a pass holds the GIL, so it stalls every request in flight"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.queries", description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=1_000_000, help="orders in the read store")
    parser.add_argument("--read-store", choices=("sqlite", "es"), default="sqlite")
    parser.add_argument(
        "--es-url",
        default=os.environ.get("ORDERSTREAM_TEST_ES_URL") or "http://127.0.0.1:9200",
        help="Elasticsearch node for --read-store es (default $ORDERSTREAM_TEST_ES_URL, else the local node)",
    )
    parser.add_argument(
        "--db", type=Path, help="SQLite: keep the read store here (reused if it holds --orders)"
    )
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per query")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=50, help="rounds of each raw SQL / took timing")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="instead of wrk: CPU per request in process (SQLite: needs --db), beside each --src",
    )
    parser.add_argument(
        "--src",
        action="append",
        default=[],
        help="SQLite: also measure another checkout's src (e.g. /work/main/src), case by case (repeat)",
    )
    parser.add_argument("--requests", type=int, default=2000, help="--cpu: requests per case per round")
    parser.add_argument("--rounds-cpu", type=int, default=3, help="--cpu: rounds per contender")
    parser.add_argument("--cpu-child", metavar="READ_STORE_URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.cpu_child is not None:
        import uvloop

        print(msgspec.json.encode(uvloop.run(_cpu_child(args.cpu_child, args.requests))).decode())
        return
    if args.cpu:
        run_cpu(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-queries-") as tmp:
        if args.read_store == "es":
            run_es(args, Path(tmp))
        else:
            run_sqlite(args, Path(tmp))


if __name__ == "__main__":
    main()
