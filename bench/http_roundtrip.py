"""Command round trip over HTTP: ``python -m bench.http_roundtrip [--orders N]``.

Starts ``orderstream serve --no-sagas`` (uvicorn, the projection runners, the
embedded SQLite stores) in a subprocess on 127.0.0.1, a random port and a temp
data directory, then drives it with ``httpx.AsyncClient`` at a fixed
concurrency:

1. ``POST /orders``: throughput and p50/p99 latency, beside the reference
   measured in the same run: the same number of direct ``UseCases.place_order``
   calls in this process (no HTTP, no JSON, no Litestar; same store kind, same
   concurrency, a temp data dir of its own). The ratio is what HTTP and the
   API layer cost. The two contenders run in interleaved rounds, so that disk
   (fsync) drift hits both alike.
2. ``GET /orders/{id}``: the same, beside direct ``Queries.get_order`` calls on
   the server's read store (opened by this process too: SQLite WAL allows it).

Bounded: a fixed number of requests, timeouts on everything, loopback only;
the server is stopped (SIGTERM, then SIGKILL) whatever happens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.figures import Figure
from orderstream.application.commands import CommandContext
from orderstream.application.use_cases import LineRequest
from orderstream.bootstrap import Container, build
from orderstream.config import Settings
from orderstream.domain.common import Money
from orderstream.domain.orders import Address

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 60.0
REQUEST_TIMEOUT = 30.0
PHASE_TIMEOUT = 600.0
SKUS = [f"BENCH-{i}" for i in range(8)]
CONNECTIONS_PER_CLIENT = 4
ADDRESS = {
    "name": "Bench",
    "line1": "1 Loop Road",
    "city": "Localhost",
    "postal_code": "127",
    "country": "NL",
}

console = Console()


async def drive(
    count: int,
    concurrency: int,
    call: Callable[[int, int], Awaitable[bool]],
    figure: Figure,
    advance: Callable[[], None],
) -> None:
    """``count`` calls ``call(index, worker)``, at most ``concurrency`` at a time."""
    next_index = 0

    async def worker(number: int) -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            ok = await call(i, number)
            figure.latencies.append(time.perf_counter() - started)
            if ok:
                figure.count += 1
            else:
                figure.errors += 1
            advance()

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(concurrency))), PHASE_TIMEOUT)
    figure.seconds += time.perf_counter() - started


# ------------------------------------------------------------------------------ server


class Server:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> str:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orderstream.cli",
                "serve",
                "--no-sagas",
                "--host",
                HOST,
                "--port",
                "0",
                "--data-dir",
                str(self.data_dir),
                "--log-level",
                "warning",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.process.returncode}")
                continue
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
            if found:
                self.url = found.group(1)
                return self.url
        raise RuntimeError("the server did not start in time")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


def order_body(i: int) -> dict[str, Any]:
    return {
        "customer_id": f"cust-{i % 50}",
        "lines": [{"sku": SKUS[i % len(SKUS)], "quantity": 1 + i % 3}],
        "shipping_address": ADDRESS,
        "payment_method": {"token": "tok_approve"},
    }


async def seed_http(client: httpx.AsyncClient) -> None:
    for sku in SKUS:
        r = await client.post(
            "/products", json={"sku": sku, "name": sku, "price": {"amount": 999, "currency": "EUR"}}
        )
        r.raise_for_status()
        r = await client.post(f"/products/{sku}/stock", json={"quantity": 1_000_000})
        r.raise_for_status()


async def seed_direct(container: Container) -> None:
    context = CommandContext(actor="bench")
    for sku in SKUS:
        await container.use_cases.register_product(sku, sku, Money(999, "EUR"), context)
        await container.use_cases.add_stock(sku, 1_000_000, context)


# -------------------------------------------------------------------------------- main


async def main(orders: int, concurrency: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="orderstream-bench-http-") as tmp:
        server = Server(Path(tmp) / "server")
        try:
            url = server.start()
            console.print(f"server: {url} (serve --no-sagas, SQLite stores in {tmp})")
            await run_figures(url, Path(tmp), orders, concurrency, rounds)
        finally:
            server.stop()


async def run_figures(url: str, tmp: Path, orders: int, concurrency: int, rounds: int) -> None:
    figures = {name: Figure() for name in ("post", "place", "get", "get_direct", "health")}
    ids: list[str] = []
    last_position = 0
    # One pool per CONNECTIONS_PER_CLIENT workers: httpx's pool slows down sharply with many
    # connections in one pool (against a no-op ASGI app here: 32 in one pool ~210 req/s,
    # 8 pools of 4 ~750 req/s), and the client must not be what is measured.
    clients = [
        httpx.AsyncClient(
            base_url=url,
            timeout=REQUEST_TIMEOUT,
            limits=httpx.Limits(max_connections=CONNECTIONS_PER_CLIENT),
        )
        for _ in range(-(-concurrency // CONNECTIONS_PER_CLIENT))
    ]

    def client(worker: int) -> httpx.AsyncClient:
        return clients[worker // CONNECTIONS_PER_CLIENT]

    direct = await build(Settings(data_dir=tmp / "direct"))
    try:
        await seed_http(clients[0])
        await seed_direct(direct)
        per_round = max(1, orders // rounds)

        async def post(i: int, worker: int) -> bool:
            nonlocal last_position
            r = await client(worker).post("/orders", json=order_body(i))
            if r.status_code != 201:
                return False
            body = r.json()
            ids.append(body["id"])
            last_position = max(last_position, body["position"])
            return True

        async def place(i: int, _worker: int) -> bool:
            body = order_body(i)
            await direct.use_cases.place_order(
                customer_id=body["customer_id"],
                lines=[LineRequest(line["sku"], line["quantity"]) for line in body["lines"]],
                shipping_address=Address(**ADDRESS),
                payment_token="tok_approve",
                context=CommandContext(actor="bench"),
            )
            return True

        with progress() as bar:
            task = bar.add_task("POST /orders vs place_order", total=2 * per_round * rounds)
            for _ in range(rounds):
                await drive(per_round, concurrency, post, figures["post"], lambda: bar.advance(task))
                await drive(per_round, concurrency, place, figures["place"], lambda: bar.advance(task))

        # The read model catches up, then both sides read the same documents.
        r = await clients[0].get(f"/orders/{ids[-1]}", params={"min_position": last_position}, timeout=120)
        r.raise_for_status()
        reader = await build(Settings(data_dir=tmp / "server"))
        try:

            async def get(i: int, worker: int) -> bool:
                r = await client(worker).get(f"/orders/{ids[i % len(ids)]}")
                return r.status_code == 200

            async def get_direct(i: int, _worker: int) -> bool:
                await reader.queries.get_order(ids[i % len(ids)])
                return True

            async def health(_i: int, worker: int) -> bool:
                r = await client(worker).get("/health")
                return r.status_code == 200

            with progress() as bar:
                task = bar.add_task("GET /orders/{id} vs get_order", total=3 * per_round * rounds)
                for _ in range(rounds):
                    await drive(per_round, concurrency, get, figures["get"], lambda: bar.advance(task))
                    await drive(
                        per_round, concurrency, get_direct, figures["get_direct"], lambda: bar.advance(task)
                    )
                    await drive(per_round, concurrency, health, figures["health"], lambda: bar.advance(task))
        finally:
            await reader.close()
    finally:
        await direct.close()
        for c in clients:
            await c.aclose()
    report(orders, concurrency, figures)


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    )


def report(orders: int, concurrency: int, figures: dict[str, Figure]) -> None:
    table = Table(title=f"command round trip: {orders} orders, concurrency {concurrency}")
    for column in ("over HTTP", "orderstream", "reference", "measured", "ratio"):
        table.add_column(column)

    def cell(f: Figure) -> str:
        text = f"{f.rate:,.0f}/s\np50 {f.percentile(0.5):.1f} ms\np99 {f.percentile(0.99):.1f} ms"
        return text + (f"  ({f.errors} errors)" if f.errors else "")

    def row(name: str, ours: Figure, reference: str, ref: Figure) -> None:
        table.add_row(
            name,
            cell(ours),
            reference,
            cell(ref),
            f"{ours.rate / ref.rate:.2f}x rate\n{ours.percentile(0.5) / ref.percentile(0.5):.1f}x p50",
        )

    row("POST /orders", figures["post"], "UseCases.place_order in-process", figures["place"])
    row("GET /orders/{id}", figures["get"], "Queries.get_order in-process", figures["get_direct"])
    row("GET /orders/{id}", figures["get"], "GET /health (HTTP + client floor)", figures["health"])
    console.print(table)
    errors = figures["post"].errors + figures["get"].errors
    if errors:
        console.print(f"[red]{errors} requests failed[/red]")
    console.print(
        "References run in this run: the same use case in this process (no HTTP), and the "
        "cheapest route over the same client and server (what HTTP and the client cost). "
        "Client, server and the in-process reference share the machine's cores."
    )
    if figures["post"].latencies:
        console.print(f"mean POST latency {statistics.fmean(figures['post'].latencies) * 1000:.1f} ms")


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--orders", type=int, default=2000, help="orders per contender (default 2000)")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (default 32)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    args = parser.parse_args()
    if not 1 <= args.orders <= 200_000 or not 1 <= args.concurrency <= 512 or not 1 <= args.rounds <= 20:
        parser.error("--orders 1..200000, --concurrency 1..512, --rounds 1..20")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main(args.orders, args.concurrency, args.rounds))


if __name__ == "__main__":
    cli()
