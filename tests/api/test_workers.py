"""``orderstream api --workers 2``: two real API worker processes on one port and one events.db.

Every acknowledged write is in the store exactly once, whichever process took it;
concurrent writes to one stream from both processes lose nothing (optimistic
concurrency holds across processes); SIGTERM to the first process drains both workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from orderstream.domain import orders
from tests.api.helpers import order_body
from tests.api.test_cli import _env
from tests.tokens import admin_headers, bearer, token_for

PRODUCT = {"sku": "SKU-1", "name": "Mug", "price": {"amount": 100, "currency": "EUR"}}
ACCESS_LINE = re.compile(r"\"(\w+) (\S+) HTTP/1\.1\" (\d+)")


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """``orderstream api --workers 2`` with access logs (each line carries its pid)."""
    with started_two_workers(tmp_path) as started:
        yield started


@contextlib.contextmanager
def started_two_workers(tmp_path: Path, **env: str) -> Iterator[tuple[subprocess.Popen[str], str, Path]]:
    """The process of :func:`two_workers`, with ``env`` added to its environment."""
    data_dir = tmp_path / "data"
    options = ["--data-dir", str(data_dir), "--access-log"]
    stderr = (tmp_path / "stderr.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "orderstream.cli", "api", "--workers", "2", "--port", "0", *options],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env={**_env(), **env},
    )
    assert process.stdout is not None
    url = None
    deadline = time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = process.stdout.readline()
        if found := re.search(r"listening on (http://127\.0\.0\.1:\d+)", line):
            url = found.group(1)
        elif not line and process.poll() is not None:
            break
    try:
        assert url is not None, "orderstream api --workers 2 did not start"
        yield process, url, data_dir
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        stderr.close()


def served_by(log: Path, method: str, path: str) -> Counter[int]:
    """How many ``method path`` requests each process answered, from the access log."""
    counts: Counter[int] = Counter()
    for line in log.read_text().splitlines():
        record = json.loads(line)  # stderr is no terminal: JSON lines (orderstream.logging_setup)
        found = ACCESS_LINE.search(record["message"]) if record["logger"] == "uvicorn.access" else None
        if found and found.group(1) == method and found.group(2) == path:
            counts[int(record["process"])] += 1
    return counts


def workers_of(pid: int) -> list[int]:
    """The two API worker processes started by ``pid``."""
    children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    assert len(children) == 2, children
    return children


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def stored(data_dir: Path, sql: str, *params: str) -> list[tuple[str, ...]]:
    with sqlite3.connect(data_dir / "events.db") as conn:
        return conn.execute(sql, params).fetchall()


async def many_clients(url: str, n: int, data_dir: Path) -> list[httpx.AsyncClient]:
    """``n`` admin clients of one connection each: SO_REUSEPORT spreads connections, not requests."""
    headers = admin_headers(data_dir)
    return [
        httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=1), headers=headers)
        for _ in range(n)
    ]


async def test_both_workers_write_and_every_acknowledged_write_is_stored_once(
    two_workers: tuple[subprocess.Popen[str], str, Path], tmp_path: Path
) -> None:
    process, url, data_dir = two_workers
    workers = workers_of(process.pid)
    clients = await many_clients(url, 16, data_dir)
    try:
        first = clients[0]
        assert (await first.post("/products", json=PRODUCT)).status_code == 201

        async def place(i: int) -> httpx.Response:
            return await clients[i % len(clients)].post("/orders", json=order_body(customer_id=f"c-{i}"))

        async def add_one(i: int) -> httpx.Response:
            # All on one stream: the two processes race on product-SKU-1's revision.
            return await clients[i % len(clients)].post("/products/SKU-1/stock", json={"quantity": 1})

        placed = await asyncio.gather(*(place(i) for i in range(160)))
        added = await asyncio.gather(*(add_one(i) for i in range(80)))
    finally:
        for client in clients:
            await client.aclose()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0

    assert [r.status_code for r in placed] == [201] * len(placed)
    # A stock addition that lost the race more often than the handler retries is an honest 409.
    assert {r.status_code for r in added} <= {200, 409}
    accepted = sorted(r.json()["revision"] for r in added if r.status_code == 200)
    assert accepted
    by_process = served_by(tmp_path / "stderr.log", "POST", "/orders")
    assert set(by_process) == set(workers), f"not every worker took connections: {by_process}"
    assert sum(by_process.values()) == len(placed)

    ids = [r.json()["id"] for r in placed]
    assert len(set(ids)) == len(ids)
    rows = stored(data_dir, "SELECT stream, revision FROM events WHERE type = 'OrderPlaced'")
    assert sorted(stream for stream, _ in rows) == sorted(orders.stream_name(i) for i in ids)
    assert {revision for _, revision in rows} == {0}
    # Every accepted stock addition is one event at the revision it was answered with; a refused
    # one wrote nothing: the stream holds exactly the accepted ones, none lost, none twice.
    revisions = stored(
        data_dir,
        "SELECT revision FROM events WHERE stream = ? AND type = 'StockAdded' ORDER BY 1",
        "product-SKU-1",
    )
    assert [r for (r,) in revisions] == accepted == list(range(1, len(accepted) + 1))


async def test_sigterm_drains_both_workers_without_losing_an_acknowledged_order(
    two_workers: tuple[subprocess.Popen[str], str, Path],
) -> None:
    process, url, data_dir = two_workers
    workers = workers_of(process.pid)
    acknowledged: list[str] = []
    clients = await many_clients(url, 16, data_dir)
    try:
        assert (await clients[0].post("/products", json=PRODUCT)).status_code == 201

        async def place(i: int) -> None:
            await asyncio.sleep(i * 0.002)
            try:
                r = await clients[i % len(clients)].post("/orders", json=order_body(customer_id=f"c-{i}"))
            except httpx.HTTPError:
                return  # refused once the servers stopped accepting: never acknowledged
            assert r.status_code < 500, r.text
            if r.status_code == 201:
                acknowledged.append(r.json()["id"])

        async def terminate() -> None:
            await asyncio.sleep(0.15)
            process.send_signal(signal.SIGTERM)

        await asyncio.gather(*(place(i) for i in range(200)), terminate())
    finally:
        for client in clients:
            await client.aclose()
    assert process.wait(timeout=60) == 0
    assert process.stdout is not None
    assert "stopped" in process.stdout.read()
    assert not any(map(alive, workers)), "a worker outlived the first process"
    assert acknowledged, "no request got through before the shutdown"
    rows = Counter(
        stream for (stream,) in stored(data_dir, "SELECT stream FROM events WHERE type = 'OrderPlaced'")
    )
    assert all(rows[orders.stream_name(i)] == 1 for i in acknowledged)


def test_a_worker_stops_when_the_first_process_dies(
    two_workers: tuple[subprocess.Popen[str], str, Path],
) -> None:
    process, _url, _data_dir = two_workers
    workers = workers_of(process.pid)
    process.kill()  # no SIGTERM: the workers must notice by themselves
    process.wait()
    deadline = time.monotonic() + 15
    while any(map(alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, workers))


async def test_the_write_rate_limit_holds_across_both_workers(tmp_path: Path) -> None:
    """Counted in each process's memory, one identity got the limit once per worker:
    240 writes a minute through the default two (a hostile run). The counts are the
    data dir's now: 10 a minute means 10, whichever worker takes each connection."""
    with started_two_workers(tmp_path, ORDERSTREAM_WRITE_RATE_LIMIT="10/minute") as (process, url, data_dir):
        workers = workers_of(process.pid)
        customer = bearer(token_for(data_dir, "customer", customer_id="cust-4"))
        statuses = []
        for _ in range(30):  # one connection per request: both workers take some
            async with httpx.AsyncClient(base_url=url, timeout=60, headers=customer) as client:
                statuses.append((await client.post("/orders", json={})).status_code)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0

    assert statuses[:10] == [422] * 10  # counted, then refused for the body
    assert statuses[10:] == [429] * 20
    by_process = served_by(tmp_path / "stderr.log", "POST", "/orders")
    assert set(by_process) == set(workers), f"one worker took every connection: {by_process}"
