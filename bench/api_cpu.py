"""CPU per ``POST /orders`` inside the app: ``python -m bench.api_cpu [--src DIR ...]``.

wrk against a server on a shared 2-core machine measures the machine as much as the
app (the server got 0.34-0.94 cores in one sitting). This drives the ASGI app built
by ``create_app`` straight through its ASGI callable (no server, no socket, no HTTP
client), from 32 concurrent tasks as wrk's 32 connections would, and prints the
process's CPU time per request (event loop and writer thread), beside the bare
Litestar + msgspec app (``bench/bare_app.py``) driven the same way in the same run.
What it leaves out is what both share: uvicorn's parsing and socket writes.

``--src DIR`` (repeatable) measures another checkout's ``src`` too (e.g.
``/work/main/src``), each round of each contender in its own process, interleaved.
Each order has its own body and ``Idempotency-Key``; half take one line of a hot SKU.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 32
SKUS = ["BENCH-HOT", *(f"BENCH-{i}" for i in range(8))]

Asgi = Callable[..., Awaitable[None]]


async def call(
    app: Asgi,
    method: str,
    path: str,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    query_string: bytes = b"",
) -> int:
    """One request through the ASGI callable; the answer's status."""
    status = 0
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query_string,
        "headers": [
            (b"host", b"bench"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }
    await app(scope, receive, send)
    return status


def order_body(n: int) -> bytes:
    lines = [{"sku": SKUS[0], "quantity": 1}] if n % 2 else [{"sku": SKUS[1 + n % 8], "quantity": 1 + n % 3}]
    return json.dumps(
        {
            "customer_id": f"c-{n}",
            "lines": lines,
            "shipping_address": {
                "name": f"Bench {n}",
                "line1": "1 Loop Road",
                "city": "Utrecht",
                "postal_code": "127",
                "country": "NL",
            },
            "payment_method": {"token": "tok_approve"},
        }
    ).encode()


async def drive(app: Asgi, requests: int, auth: list[tuple[bytes, bytes]], tag: str) -> float:
    """CPU seconds per request of ``requests`` POST /orders from 32 tasks."""
    bodies = [order_body(n) for n in range(requests)]
    failures: list[int] = []

    async def worker(first: int) -> None:
        for n in range(first, requests, CONCURRENCY):
            key = [(b"idempotency-key", f"{tag}-{n}".encode())]
            status = await call(app, "POST", "/orders", bodies[n], auth + key)
            if status >= 300:
                failures.append(status)

    started = time.process_time()
    await asyncio.gather(*(worker(i) for i in range(CONCURRENCY)))
    spent = time.process_time() - started
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[:5]}")
    return spent / requests


async def measure_orderstream(requests: int) -> float:
    from orderstream.api.app import create_app
    from orderstream.bootstrap import build
    from orderstream.config import Settings

    with tempfile.TemporaryDirectory(prefix="api-cpu-") as tmp:
        settings = Settings(data_dir=Path(tmp) / "data")
        container = await build(settings)
        try:
            app = create_app(container, extra_route_handlers=(), background=())
            auth = admin_authorization(settings)
            for sku in SKUS:
                body = {"sku": sku, "name": sku, "price": {"amount": 1250, "currency": "EUR"}}
                status = await call(app, "POST", "/products", json.dumps(body).encode(), auth)
                stock = json.dumps({"quantity": 1_000_000}).encode()
                status = max(status, await call(app, "POST", f"/products/{sku}/stock", stock, auth))
                if status >= 300:
                    raise RuntimeError(f"seeding {sku}: {status}")
            await drive(app, 300, auth, "warm")
            return await drive(app, requests, auth, "run")
        finally:
            await container.close()


def admin_authorization(settings: Any) -> list[tuple[bytes, bytes]]:
    """An admin token of the local issuer, or nothing on a checkout without auth."""
    try:
        from orderstream.auth.local_issuer import issue_token
    except ImportError:
        return []
    return [(b"authorization", f"Bearer {issue_token(settings, ['admin'], ttl=3600)}".encode())]


async def measure_bare(requests: int) -> float:
    from bench.bare_app import app

    await drive(app, 300, [], "warm")
    return await drive(app, requests, [], "run")


def child(contender: str, requests: int) -> None:
    import uvloop

    measure = measure_bare if contender == "bare" else measure_orderstream
    print(json.dumps({"cpu_per_request": uvloop.run(measure(requests))}))


def run_child(contender: str, src: str | None, requests: int) -> float:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [src, env.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "bench.api_cpu", "--child", contender, "--requests", str(requests)]
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{contender} {src or ''}: {done.stderr[-2000:]}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["cpu_per_request"])


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000, help="POSTs per round (default 3000)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--src", action="append", default=[], help="another checkout's src dir (repeat)")
    parser.add_argument("--child", choices=("orderstream", "bare"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.requests)
        return
    contenders: list[tuple[str, str, str | None]] = [("this checkout", "orderstream", None)]
    contenders += [(src, "orderstream", src) for src in args.src]
    contenders.append(("bare Litestar + msgspec app", "bare", None))
    results: dict[str, list[float]] = {label: [] for label, _, _ in contenders}
    for round_ in range(args.rounds):
        for label, kind, src in contenders:
            seconds = run_child(kind, src, args.requests)
            results[label].append(seconds)
            print(f"round {round_ + 1}: {label}: {seconds * 1e6:.0f} us CPU per POST /orders", flush=True)
    bare = statistics.median(results["bare Litestar + msgspec app"])
    print(f"\nCPU per POST /orders in process ({args.requests} per round, {args.rounds} rounds, 32 tasks):")
    for label, values in results.items():
        low, high = min(values) * 1e6, max(values) * 1e6
        median = statistics.median(values)
        print(
            f"  {label}: {low:.0f}-{high:.0f} us (median {median * 1e6:.0f}), "
            f"{bare / median:.2f}x the bare app's requests per CPU-second"
        )


if __name__ == "__main__":
    cli()
