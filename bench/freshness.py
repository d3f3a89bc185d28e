"""Append to queryable over HTTP under write load: ``python -m bench.freshness``.

The production split of the service: ``orderstream api`` (HTTP, commands, queries) and
``orderstream project`` (the projections) as two processes on one data dir, on the
SQLite read store and, with ``--read-store es``, on Elasticsearch (a fresh index
prefix, deleted at the end). For each ``--rates`` figure, wrk places orders with
``bench/wrk/paced.lua`` at that total rate (open loop: ``delay()`` schedules every
request, so a slow answer does not slow the offered load while connections are free)
while a probe in this process places one order every ``--probe-every`` (100 ms), with
its own token in the shipping name, and times

    POST /orders  ->  GET /orders?q=<token>&min_position=<position> listing the order

i.e. until the order is found by full-text search, read-your-writes included. The probe
is Python, which is fine for a latency at 10 requests/s: the load is wrk's.

Printed per read store and rate: append-to-queryable p50/p99 beside the probe's own
POST p50/p99 (the write alone, same requests), the write rate wrk achieved (201/s)
against the rate offered, the GETs a probe needed (more than one means the order was
not in the first answer) and the servers' CPU. The first row of each store is the same
probe on the idle service (rate 0): the floor measured in the same run.
Target (issue 8): p99 <= 100 ms at the API's target write load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench import auth as bench_auth
from bench import processes
from bench.figures import Figure
from bench.load import (
    Service,
    Setup,
    WrkResult,
    catalogue,
    free_port,
    parse_wrk,
    running,
    seed,
    wrk_command,
    wrk_env,
)
from bench.queries import delete_es, es_reachable

PROBE_SKU = "BENCH-0"
GIVE_UP_SECONDS = 15.0
"""A probe not queryable by then counts as failed (the API's min_position wait is 5 s)."""


@dataclass
class Probe:
    """One probe order: its POST latency and its append-to-queryable latency (seconds)."""

    post: float
    queryable: float | None
    gets: int
    statuses: list[int] = field(default_factory=list)


def probe_body(token: str) -> dict[str, object]:
    return {
        "customer_id": f"c-{token}",
        "lines": [{"sku": PROBE_SKU, "quantity": 1}],
        "shipping_address": {
            "name": f"Probe {token}",
            "line1": "1 Probe Road",
            "city": "Utrecht",
            "postal_code": "3511",
            "country": "NL",
        },
        "payment_method": {"token": "tok_approve"},
    }


async def probe_once(client: httpx.AsyncClient) -> Probe:
    """POST one order, then search its token with ``min_position`` until it is listed."""
    token = f"probe{uuid.uuid4().hex[:12]}"
    started = time.perf_counter()
    answer = await client.post("/orders", json=probe_body(token), headers={"Idempotency-Key": token})
    posted = time.perf_counter() - started
    if answer.status_code != 201:
        return Probe(posted, None, 0, [answer.status_code])
    written = answer.json()
    params = {"q": token, "min_position": str(written["position"]), "limit": "5"}
    probe = Probe(posted, None, 0)
    while time.perf_counter() - started < GIVE_UP_SECONDS:
        page = await client.get("/orders", params=params)
        probe.gets += 1
        probe.statuses.append(page.status_code)
        if page.status_code == 200 and any(item["id"] == written["id"] for item in page.json()["items"]):
            probe.queryable = time.perf_counter() - started
            break
    return probe


async def run_probes(url: str, seconds: float, every: float) -> list[Probe]:
    """One probe started every ``every`` s for ``seconds`` (open loop: a slow probe does not
    delay the next); every probe finishes."""
    async with httpx.AsyncClient(
        base_url=url, timeout=GIVE_UP_SECONDS + 5, headers=bench_auth.headers(url)
    ) as client:
        tasks = []
        started = time.monotonic()
        k = 0
        while (due := started + k * every) < started + seconds:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            tasks.append(asyncio.create_task(probe_once(client)))
            k += 1
        return list(await asyncio.gather(*tasks))


@dataclass
class Row:
    store: str
    rate: float
    probes: list[Probe]
    load: WrkResult | None
    seconds: float
    cores: float

    def line(self) -> str:
        found = [p.queryable for p in self.probes if p.queryable is not None]
        posts = [p.post for p in self.probes]
        failed = len(self.probes) - len(found)
        extra_gets = sum(1 for p in self.probes if p.gets > 1)
        if self.load is not None:
            created = self.load.statuses.get(201, 0)
            achieved = f"{created / self.seconds:>7.0f} {self.load.non_2xx:>6d}"
        else:
            achieved = f"{0:>7.0f} {0:>6d}"
        return (
            f"{self.store:<15} {self.rate:>7.0f} {achieved} {len(self.probes):>6d} "
            f"{ms(found, 0.5):>8.1f} {ms(found, 0.99):>8.1f} {ms(posts, 0.5):>8.1f} {ms(posts, 0.99):>8.1f}"
            f" {extra_gets:>6d} {failed:>6d} {self.cores:>6.2f}"
        )


HEADER = (
    f"{'read store':<15} {'offered':>7} {'201/s':>7} {'non2xx':>6} {'probes':>6} "
    f"{'q p50':>8} {'q p99':>8} {'POST p50':>8} {'POST p99':>8} {'>1 GET':>6} {'failed':>6} {'cores':>6}"
)


def ms(values: list[float], fraction: float) -> float:
    """The latency at ``fraction`` of ``values`` (seconds), in ms."""
    return Figure(latencies=values).percentile(fraction)


def measure(
    store: str,
    rate: float,
    servers: list[Service],
    args: argparse.Namespace,
    py_spy: Path | None,
) -> Row:
    """Probe for ``args.seconds`` while wrk (if ``rate``) paces ``POST /orders`` at ``rate``."""
    api = servers[0]
    pids = [s.pid for s in servers]
    wrk: subprocess.Popen[str] | None = None
    spies = []
    cpu_before = processes.cpu_seconds(pids)
    started = time.monotonic()
    if rate:
        command = wrk_command(
            "paced",
            api.url,
            connections=args.connections,
            threads=2,
            seconds=args.seconds + 1,
            args={"tag": uuid.uuid4().hex[:8], "rate": rate, "threads": 2},
        )
        wrk = subprocess.Popen(command, env=wrk_env(api.url), stdout=subprocess.PIPE, text=True)
        time.sleep(1)  # let wrk open its connections and reach its pace
        if py_spy is not None:
            for server in servers:
                output = py_spy / f"{store.split()[0].lower()}-{rate:.0f}-{server.name.replace(' ', '-')}.txt"
                spies.append((server.name, output, processes.record(server.pid, output, args.seconds)))
    probes = asyncio.run(run_probes(api.url, args.seconds, args.probe_every))
    load = None
    if wrk is not None:
        printed, _ = wrk.communicate(timeout=args.seconds + 60)
        load = parse_wrk(f"paced {rate}", printed)
    elapsed = time.monotonic() - started
    cores = (processes.cpu_seconds(pids) - cpu_before) / elapsed
    for name, output, spy in spies:
        spy.wait(60)
        print(f"  py-spy of {name} -> {output}")
        for line in processes.summarize(output).lines():
            print(f"    {line}")
    seconds = float(load.figures["seconds"]) if load is not None else elapsed
    row = Row(store, rate, probes, load, seconds, cores)
    print(f"  {row.line()}", flush=True)
    return row


def run_store(
    store: str, read_store_args: tuple[str, ...], args: argparse.Namespace, workdir: Path
) -> list[Row]:
    setup = Setup(workdir)
    data_dir = setup.data_dir()
    api = setup.orderstream("api", data_dir, free_port(), *read_store_args)
    projector = setup.orderstream("project", data_dir, None, *read_store_args)
    rows = []
    with running(api, projector):
        seed(api.url, catalogue())
        asyncio.run(run_probes(api.url, 1, args.probe_every))  # warm-up: first queries, connections
        for rate in [0.0, *args.rates]:
            label = "idle (no load)" if not rate else f"{rate:.0f} POST/s offered"
            print(
                f"{store}: {label}, {args.seconds:.0f} s of probes every {args.probe_every * 1000:.0f} ms ..."
            )
            rows.append(measure(store, rate, [api, projector], args, args.py_spy if rate else None))
            api.check_alive()
            projector.check_alive()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--read-store", default="sqlite,es", help="sqlite, es or both (default sqlite,es)")
    parser.add_argument(
        "--es-url",
        default=os.environ.get("ORDERSTREAM_TEST_ES_URL") or "http://127.0.0.1:9200",
        help="Elasticsearch node (default $ORDERSTREAM_TEST_ES_URL, else local; skipped if none answers)",
    )
    parser.add_argument(
        "--rates",
        type=lambda text: [float(r) for r in text.split(",") if r],
        default=[200.0, 400.0],
        help="POST /orders per second wrk offers, comma-separated (default 200,400)",
    )
    parser.add_argument("--seconds", type=float, default=20, help="probing time per rate (default 20)")
    parser.add_argument("--probe-every", type=float, default=0.1, help="seconds between probes (default 0.1)")
    parser.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    parser.add_argument(
        "--py-spy", type=Path, default=None, metavar="DIR", help="profile the loaded runs into DIR"
    )
    args = parser.parse_args(argv)
    stores = [s.strip() for s in args.read_store.split(",") if s.strip()]
    if not stores or set(stores) - {"sqlite", "es"}:
        parser.error("--read-store: sqlite, es or sqlite,es")
    if args.py_spy is not None:
        processes.py_spy()
        args.py_spy.mkdir(parents=True, exist_ok=True)

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-freshness-") as workdir:
        if "sqlite" in stores:
            rows += run_store("SQLite", (), args, Path(workdir))
        if "es" in stores:
            if not es_reachable(args.es_url):
                print(f"no Elasticsearch node at {args.es_url}: the es run is skipped", file=sys.stderr)
            else:
                prefix = f"bench-fresh-{uuid.uuid4().hex[:8]}-"
                try:
                    rows += run_store(
                        "Elasticsearch",
                        ("--read-store", f"{args.es_url}?prefix={prefix}"),
                        args,
                        Path(workdir),
                    )
                finally:
                    with contextlib.suppress(Exception):
                        asyncio.run(delete_es(args.es_url, prefix))

    print()
    print(
        f"append to queryable over HTTP (POST -> GET /orders?q=<token>&min_position=<position> lists it), "
        f"orderstream api + project, probe every {args.probe_every * 1000:.0f} ms, wrk paced, "
        f"{args.connections} connections"
    )
    print(HEADER)
    for row in rows:
        print(row.line())
    print(
        "q p50/p99: POST start to the search listing the order (ms); "
        "POST p50/p99: the same probes' POST alone;\n"
        "201/s: orders wrk got placed per second (offered: its pace); "
        ">1 GET: probes whose first search missed;\n"
        "cores: CPU of api + project per second of the run. "
        "Target (issue 8): q p99 <= 100 ms under the write load."
    )
    if any(probe.queryable is None for row in rows for probe in row.probes):
        sys.exit(1)  # a probe never became queryable: a failure, not a figure


if __name__ == "__main__":
    main()
