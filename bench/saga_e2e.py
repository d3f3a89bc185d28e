"""Sagas end to end: ``python -m bench.saga_e2e [--rate 100] [--seconds 60] [--hot 500]``.

Starts ``orderstream serve`` (API, projections, saga trigger and worker, the
embedded Temporal dev server on ports of its own) in a temp data directory and
drives it over HTTP with ``httpx``:

1. **Sustained**: ``POST /orders`` (``tok_approve``, one line on one of 8 SKUs
   with ample stock) open loop at ``--rate`` per second for ``--seconds``. Prints
   orders shipped per second during the load beside the reference of the same
   run: orders accepted (201) per second, i.e. what the sagas had to keep up
   with; and the time from the end of the load until ``/ready`` reports the
   trigger's lag and the running sagas at 0.
2. **One hot SKU** (a fresh server): ``--hot`` concurrent orders of one unit on
   one SKU with half as much in stock. Prints shipped, rejected, the stock left
   (write side, from ``GET /products/HOT`` once the projection caught up) and the
   seconds from the last 201 until every order is terminal, beside the same
   number of orders spread over 8 SKUs with ample stock (no contention).

Shipped and terminal orders are counted in the server's ``events.db`` (read
only; SQLite WAL allows it). Every wait is bounded; the server is stopped
(SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
SKUS = [f"SKU-{i}" for i in range(8)]
ADDRESS = {
    "name": "Bench",
    "line1": "1 Loop Road",
    "city": "Localhost",
    "postal_code": "127",
    "country": "NL",
}
TERMINAL = ("OrderShipped", "OrderRejected", "OrderCancelled")
DRAIN_TIMEOUT = 300.0
POLL = 0.2


async def poll(check: Callable[[], Awaitable[bool]]) -> None:
    """Until ``check()`` holds or DRAIN_TIMEOUT seconds passed."""
    deadline = time.perf_counter() + DRAIN_TIMEOUT
    for _ in itertools.count():
        if await check() or time.perf_counter() > deadline:
            return
        await asyncio.sleep(POLL)


_servers = itertools.count()


@contextlib.contextmanager
def serve(data_dir: Path) -> Iterator[str]:
    """``orderstream serve`` on a free HTTP port; its dev server on ports of its own
    (17233 + n, 18233 + n for the n-th server: a stopped one may hold its port a while)."""
    n = next(_servers)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "ORDERSTREAM_TEMPORAL_DEV_PORT": str(17233 + n),
        "ORDERSTREAM_TEMPORAL_UI_PORT": str(18233 + n),
    }
    command = [sys.executable, "-m", "orderstream.cli", "serve", "--host", HOST, "--port", "0"]
    command += ["--data-dir", str(data_dir), "--log-level", "warning"]
    log = data_dir / "serve.log"  # a file, not a pipe: an unread pipe fills and blocks the server
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://\S+)", log.read_text())
            if found:
                yield found.group(1)
                return
            if process.poll() is not None:
                raise RuntimeError(f"orderstream serve exited with {process.returncode}; see {log}")
            time.sleep(0.2)
        raise RuntimeError("orderstream serve did not start")
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def counts(db: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        marks = ", ".join("?" * (len(TERMINAL) + 1))
        rows = conn.execute(
            f"SELECT type, count(*) FROM events WHERE type IN ({marks}) GROUP BY type",
            ("OrderPlaced", *TERMINAL),
        ).fetchall()
    return dict(rows)


def terminal(found: dict[str, int]) -> int:
    return sum(found.get(kind, 0) for kind in TERMINAL)


def order(sku: str, i: int) -> dict[str, Any]:
    return {
        "customer_id": f"cust-{i % 50}",
        "lines": [{"sku": sku, "quantity": 1}],
        "shipping_address": ADDRESS,
        "payment_method": {"token": "tok_approve"},
    }


async def seed(client: httpx.AsyncClient, skus: list[str], stock: int) -> None:
    for sku in skus:
        price = {"amount": 999, "currency": "EUR"}
        (await client.post("/products", json={"sku": sku, "name": sku, "price": price})).raise_for_status()
        (await client.post(f"/products/{sku}/stock", json={"quantity": stock})).raise_for_status()


async def saga_lag(client: httpx.AsyncClient) -> dict[str, Any]:
    sagas: dict[str, Any] = (await client.get("/ready")).json().get("sagas") or {}
    return sagas


async def sustained(rate: float, seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="orderstream-saga-bench-") as folder, serve(Path(folder)) as url:
        db = Path(folder) / "events.db"
        async with httpx.AsyncClient(
            base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)
        ) as client:
            await seed(client, SKUS, 1_000_000)
            accepted = failed = 0

            async def place(i: int) -> None:
                nonlocal accepted, failed
                try:
                    response = await client.post("/orders", json=order(SKUS[i % len(SKUS)], i))
                except httpx.HTTPError:  # an overloaded server may drop connections
                    failed += 1
                    return
                accepted += response.status_code == 201
                failed += response.status_code != 201

            tasks: list[asyncio.Task[None]] = []
            shipped_before = counts(db).get("OrderShipped", 0)
            started = time.perf_counter()
            while (elapsed := time.perf_counter() - started) < seconds:
                while len(tasks) < int(elapsed * rate):
                    tasks.append(asyncio.create_task(place(len(tasks))))
                await asyncio.sleep(0.005)
            await asyncio.gather(*tasks)
            load_seconds = time.perf_counter() - started
            shipped = counts(db).get("OrderShipped", 0) - shipped_before
            stopped = time.perf_counter()

            async def no_lag() -> bool:
                lag = await saga_lag(client)
                return lag.get("trigger_lag_events") == 0 and lag.get("workflows_running") == 0

            await poll(no_lag)
            drained = time.perf_counter() - stopped
            final = counts(db)
    print(f"1. sustained, offered {rate:.0f}/s for {seconds:.0f} s (tok_approve, 8 SKUs)")
    print(
        f"   shipped during the load   {shipped / load_seconds:8.1f}/s"
        f"   reference: accepted {accepted / load_seconds:.1f}/s"
    )
    print(f"   saga lag back to 0 after  {drained:8.1f} s    (target <= 10 s)")
    print(f"   POSTs not accepted: {failed}; at the end: {final}")


async def burst(
    skus: list[str], count: int, stock: int
) -> tuple[dict[str, int], float, list[dict[str, Any]]]:
    """``count`` concurrent orders over ``skus``: the event counts, the seconds
    from the last 201 until all are terminal, and each SKU's stock."""
    with tempfile.TemporaryDirectory(prefix="orderstream-saga-bench-") as folder, serve(Path(folder)) as url:
        db = Path(folder) / "events.db"
        async with httpx.AsyncClient(
            base_url=url, timeout=120, limits=httpx.Limits(max_connections=100)
        ) as client:
            await seed(client, skus, stock)
            last_201 = time.perf_counter()

            async def place(i: int) -> None:
                nonlocal last_201
                if (await client.post("/orders", json=order(skus[i % len(skus)], i))).status_code == 201:
                    last_201 = time.perf_counter()

            await asyncio.gather(*(place(i) for i in range(count)))

            async def all_terminal() -> bool:
                return terminal(counts(db)) >= count

            async def none_running() -> bool:  # the steps after the terminal event (commit) land
                return (await saga_lag(client)).get("workflows_running") == 0

            await poll(all_terminal)
            seconds = time.perf_counter() - last_201
            found = counts(db)
            await poll(none_running)
            await asyncio.sleep(2)  # the products projection catches up
            stock_left = [(await client.get(f"/products/{sku}")).json() for sku in skus]
    return found, seconds, stock_left


async def hot(count: int) -> None:
    found, seconds, (product,) = await burst(["HOT"], count, count // 2)
    _, reference, _ = await burst(SKUS, count, count)
    print(f"2. {count} concurrent orders of 1 unit on one SKU with {count // 2} in stock")
    print(
        f"   shipped {found.get('OrderShipped', 0)}, rejected {found.get('OrderRejected', 0)}; stock on hand"
        f" {product['on_hand']}, reserved {product['reserved']}, available {product['available']}"
    )
    print(
        f"   all terminal {seconds:6.1f} s after the last 201"
        f"   reference (8 SKUs, ample stock): {reference:.1f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=100.0, help="orders offered per second")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--hot", type=int, default=500, help="orders of the one-SKU burst (0: skip)")
    args = parser.parse_args()
    if args.seconds > 0:
        asyncio.run(sustained(args.rate, args.seconds))
    if args.hot > 0:
        asyncio.run(hot(args.hot))


if __name__ == "__main__":
    main()
