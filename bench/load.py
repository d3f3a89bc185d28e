"""Load generator: ``python -m bench.load [--scenarios place,place-serve,mixed,burst,paced]``.

Drives the running service over HTTP with wrk (a compiled client: an asyncio
httpx client measuring itself topped out near 600 requests/s on ``/health`` on
this kind of machine, wrk near 6,000) and prints every HTTP figure beside a bare Litestar +
msgspec app (``bench/bare_app.py``) measured in the same run on the same server
runner. The Lua scripts in ``bench/wrk`` give every order its own body and
``Idempotency-Key``; half the orders take one line of one hot SKU.

Scenarios (each on a fresh temp data dir, the service started and stopped here):

- ``place``: ``POST /orders`` alone, ``--connections`` (32) for ``--duration`` s,
  on ``orderstream api``; the bare app's ``POST /orders`` beside it.
- ``place-serve``: the same on ``orderstream serve`` (projections and sagas too).
- ``mixed``: place 40%, ``GET /orders/{id}`` 30%, search 10%, ``PATCH`` 10%,
  ``DELETE`` 10%, on ``orderstream api`` with ``orderstream project`` beside it
  (the production split: reads come from the read model it writes); the bare
  app's same routes beside it. A ``GET`` of an order the projection has not
  reached yet is a 404: an expected 4xx, counted, not a failure.
- ``burst``: on ``orderstream serve`` (API, projections, sagas): ``--burst-orders``
  (500) orders of quantity 1 on ONE SKU with ``--burst-stock`` (250) in stock,
  all at once; then the read model is polled until every order is terminal:
  shipped/rejected counts, stock on hand/reserved/available, seconds from the
  last 201 to all terminal.
- ``paced``: on ``orderstream serve``: ``--rate`` (100) orders/s for
  ``--paced-seconds`` (60) with ``tok_approve`` (wrk's ``delay()`` paces them);
  orders/s reaching ``shipped`` during the load, and the seconds after the load
  until every order is terminal (saga lag 0, seen in the read model).

The wait for the sagas is bounded by ``--settle-timeout``; a run that does not
settle prints how far it got. Every figure comes from this run; the summary
table at the end repeats them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from bench import auth as bench_auth
from bench import processes

ROOT = Path(__file__).resolve().parent.parent
WRK_SCRIPTS = ROOT / "bench" / "wrk"
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
HOT_SKU = "BENCH-HOT"
OTHER_SKUS = 8  # BENCH-0 .. BENCH-7, as the Lua scripts name them
STOCK = 1_000_000  # the most one POST /products/{sku}/stock adds
TERMINAL = frozenset({"shipped", "rejected", "cancelled"})
EXPECTED_4XX = frozenset({404, 409, 412})
SCENARIOS = ("place", "place-serve", "mixed", "burst", "paced")
PROGRESS_EVERY = 5.0

console = Console(highlight=False, width=None if sys.stdout.isatty() else 150)


# ------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class Service:
    """One HTTP server process (the service or the bare app) on a free loopback port.

    It is ready when ``GET /health`` answers 200; ``stop`` sends SIGTERM (the
    service drains and closes its stores), then SIGKILL after ``STOP_TIMEOUT``.
    Output goes to a log file whose tail is printed if the process dies.
    """

    def __init__(
        self, name: str, command: list[str], log: Path, *, port: int | None, src: Path | None = None
    ) -> None:
        self.name = name
        self.src = src
        self.command = command
        self.log_path = log
        self.serves_http = port is not None
        self.url = f"http://{HOST}:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        env = dict(os.environ)
        # The other checkout's src and root (its top-level ``workflows`` package) come
        # first, and it runs in that root (``python -m`` puts the working dir first).
        first = [str(self.src), str(self.src.parent)] if self.src is not None else []
        cwd = self.src.parent if self.src is not None else ROOT
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [*first, str(ROOT), env.get("PYTHONPATH")]))
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        if self.serves_http:
            self._wait_healthy()
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer /health within {STARTUP_TIMEOUT:.0f} s")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Kill what it started too (the Temporal dev server would keep its port).
            for pid in reversed(processes.process_tree(self.pid)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.wait()


@dataclass(frozen=True)
class Setup:
    """How to start each contender: the service's extra options and the bare app's runner."""

    workdir: Path
    service_args: tuple[str, ...] = ()
    runner: str = "uvicorn"
    bare_workers: int = 1
    service_src: Path | None = None
    """Another checkout's ``src`` to run the service from (``--service-src``), e.g.
    ``main`` beside this branch with the same bench code."""

    def orderstream(self, command: str, data_dir: Path, port: int | None, *extra: str) -> Service:
        argv = [sys.executable, "-m", "orderstream.cli", command, "--data-dir", str(data_dir)]
        argv += ["--log-level", "warning", *extra]
        if port is not None:
            argv += ["--host", HOST, "--port", str(port), *self.service_args]
        name = f"orderstream {command}"
        log = self.workdir / f"{command}-{uuid.uuid4().hex[:6]}.log"
        service = Service(name, argv, log, port=port, src=self.service_src)
        if port is not None:
            bench_auth.register(service.url, data_dir)
        return service

    def bare(self) -> Service:
        port = free_port()
        app, workers = "bench.bare_app:app", str(self.bare_workers)
        if self.runner == "granian":
            argv = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", HOST, "--port"]
            argv += [str(port), "--workers", workers, "--log-level", "warning", app]
        else:  # uvicorn with its defaults (http/loop "auto"), as `orderstream api` configures it
            argv = [sys.executable, "-m", "uvicorn", app, "--host", HOST, "--port", str(port)]
            argv += ["--workers", workers, "--no-access-log", "--log-level", "warning"]
        return Service(f"bare app ({self.runner})", argv, self.workdir / "bare.log", port=port)

    def data_dir(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="data-", dir=self.workdir))


@contextlib.contextmanager
def running(*services: Service) -> Iterator[None]:
    try:
        for service in services:
            service.start()
        yield
    finally:
        for service in reversed(services):
            service.stop()


# ------------------------------------------------------------------------------ wrk


@dataclass
class WrkResult:
    """What a script's ``done()`` printed (``WRKJSON``): see bench/wrk/common.lua."""

    label: str
    figures: dict[str, Any]

    @property
    def statuses(self) -> dict[int, int]:
        return {int(k): int(v) for k, v in self.figures.get("statuses", {}).items()}

    def count(self, predicate: Callable[[int], bool]) -> int:
        return sum(n for status, n in self.statuses.items() if predicate(status))

    @property
    def rps(self) -> float:
        return float(self.figures["rps"])

    @property
    def per_cpu_second(self) -> float:
        """Requests per CPU-second of the server processes: what a shared, busy machine
        (other work taking cores from one contender and not the other) distorts least."""
        cores = float(self.figures.get("server_cores") or 0)
        return self.rps / cores if cores else float("nan")

    @property
    def non_2xx(self) -> int:
        return self.count(lambda s: not 200 <= s < 300)

    @property
    def server_errors(self) -> int:
        return self.count(lambda s: s >= 500)

    @property
    def unexpected(self) -> int:
        """Answers that are neither 2xx nor an expected 4xx (see EXPECTED_4XX)."""
        return self.count(lambda s: not 200 <= s < 300 and s not in EXPECTED_4XX)


def wrk_path() -> str:
    found = os.environ.get("WRK") or shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not installed: apt-get install -y wrk (make bench does it when root)")
    return found


def wrk_command(
    script: str, url: str, *, connections: int, threads: int, seconds: float, args: dict[str, Any]
) -> list[str]:
    script_args = [f"{k}={v}" for k, v in args.items()]
    return [
        wrk_path(),
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "30s",
        "-s",
        str(WRK_SCRIPTS / f"{script}.lua"),
        url,
        "--",
        *script_args,
    ]


def wrk_env(url: str) -> dict[str, str]:
    """LUA_PATH for ``require "common"``; the service's Authorization header (bench/auth.py)."""
    return {
        **os.environ,
        "LUA_PATH": f"{WRK_SCRIPTS}/?.lua;;",
        "WRK_AUTHORIZATION": bench_auth.authorization(url) or "",
    }


def parse_wrk(label: str, output: str) -> WrkResult:
    for line in output.splitlines():
        if line.startswith("WRKJSON "):
            return WrkResult(label, json.loads(line.removeprefix("WRKJSON ")))
    raise RuntimeError(f"wrk printed no figures for {label}:\n{output[-2000:]}")


def run_wrk(
    label: str,
    script: str,
    url: str,
    *,
    seconds: float,
    meanwhile: Callable[[], None] | None = None,
    **options: Any,
) -> WrkResult:
    """Run wrk to its end; ``meanwhile`` is called every ``PROGRESS_EVERY`` seconds."""
    command = wrk_command(script, url, seconds=seconds, **options)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, env=wrk_env(url), stdout=out, stderr=err, text=True)
        deadline = time.monotonic() + seconds + 60
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(PROGRESS_EVERY)
            if meanwhile is not None and process.poll() is None:
                meanwhile()
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise RuntimeError(f"wrk failed ({process.returncode}): {err.read()[-2000:]}")
        return parse_wrk(label, out.read())


def run_wrk_until_done(label: str, script: str, url: str, *, threads: int, **options: Any) -> WrkResult:
    """A script that prints ``WRKDONE`` per thread once it has all its answers: wrk
    always runs its full ``-d``, so interrupt it (SIGINT: it then prints its figures)."""
    command = wrk_command(script, url, threads=threads, seconds=STARTUP_TIMEOUT * 3, **options)
    process = subprocess.Popen(command, env=wrk_env(url), stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    output: list[str] = []
    finished = 0
    for line in process.stdout:
        output.append(line)
        if line.startswith("WRKDONE"):
            finished += 1
            if finished == threads:
                process.send_signal(signal.SIGINT)
    process.wait()
    return parse_wrk(label, "".join(output))


# ---------------------------------------------------------------------- HTTP helpers


def seed(url: str, skus: dict[str, int]) -> None:
    """Register each SKU at 12.50 EUR and add its stock (in steps of at most ``STOCK``)."""
    with httpx.Client(base_url=url, timeout=30, headers=bench_auth.headers(url)) as client:
        for sku, stock in skus.items():
            body = {"sku": sku, "name": f"Bench {sku}", "price": {"amount": 1250, "currency": "EUR"}}
            registered = client.post("/products", json=body)
            if registered.status_code != 201:
                raise RuntimeError(f"registering {sku}: {registered.status_code} {registered.text}")
            while stock > 0:
                quantity = min(stock, STOCK)
                added = client.post(f"/products/{sku}/stock", json={"quantity": quantity})
                if added.status_code != 200:
                    raise RuntimeError(f"stock for {sku}: {added.status_code} {added.text}")
                stock -= quantity


def catalogue() -> dict[str, int]:
    return {HOT_SKU: STOCK, **{f"BENCH-{i}": STOCK for i in range(OTHER_SKUS)}}


@dataclass
class Progress:
    """The read model's view of the orders: counts per status, and when."""

    at: float
    statuses: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    @property
    def open(self) -> int:
        return sum(n for status, n in self.statuses.items() if status not in TERMINAL)

    def __str__(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(self.statuses.items())) or "no orders yet"


def order_statuses(client: httpx.Client) -> Progress:
    """Every order's status, counted by the read model's facets (one cheap query)."""
    page = client.get("/orders", params={"limit": 1, "facets": "status"})
    page.raise_for_status()
    return Progress(time.monotonic(), dict(page.json()["facets"]["status"]))


def wait_settled(client: httpx.Client, expected: int, timeout: float, label: str) -> Progress:
    """Poll until the read model shows ``expected`` orders, all terminal (or ``timeout``);
    the last state seen."""
    deadline = time.monotonic() + timeout
    last_print = 0.0
    while True:
        now = order_statuses(client)
        if now.total >= expected and now.open == 0:
            break
        if time.monotonic() > deadline:
            console.print(f"  [yellow]{label}: not settled after {timeout:.0f} s[/yellow]")
            break
        if now.at - last_print >= PROGRESS_EVERY:
            console.print(f"  {label}: {now}")
            last_print = now.at
        time.sleep(0.25)
    console.print(f"  {label}: {now}")
    return now


# ------------------------------------------------------------------------ scenarios


@dataclass
class Report:
    http: list[tuple[str, WrkResult, WrkResult]] = field(default_factory=list)
    sagas: list[tuple[str, str, str]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


def show(result: WrkResult) -> str:
    f = result.figures
    cpu = ""
    if "server_cores" in f:
        cpu = f"; CPU: server {f['server_cores']:.2f} cores, wrk {f['client_cores']:.2f}"
    return (
        f"{f['rps']:,.0f} req/s, p50 {f['p50_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms, "
        f"non-2xx {result.non_2xx} (5xx {result.server_errors}), socket errors {f['socket_errors']}{cpu}"
    )


def ratio(ours: float, reference: float) -> float:
    return ours / reference if reference else float("nan")


def compare(report: Report, label: str, ours: WrkResult, bare: WrkResult) -> None:
    console.print(f"  orderstream: {show(ours)}")
    console.print(f"  bare app:    {show(bare)}")
    console.print(
        f"  ratio {ratio(ours.rps, bare.rps):.2f}x the bare route's rate, "
        f"{ratio(ours.per_cpu_second, bare.per_cpu_second):.2f}x its requests per server CPU-second; "
        f"statuses {dict(sorted(ours.statuses.items()))}"
    )
    report.http.append((label, ours, bare))


def measured_run(
    label: str,
    script: str,
    servers: list[Service],
    *,
    seconds: float,
    py_spy: Path | None,
    profile: str,
    **options: Any,
) -> WrkResult:
    """One wrk run on ``servers[0]`` (``options`` as for :func:`run_wrk`), with the CPU
    the servers and wrk used meanwhile (in cores) and, with ``py_spy`` (a directory), a
    profile of each server process."""
    pids = [server.pid for server in servers]
    spies = []
    if py_spy is not None:
        for server in servers:
            output = py_spy / f"{profile}-{server.name.replace(' ', '-')}.txt"
            spies.append((server.name, output, processes.record(server.pid, output, seconds)))
    cpu_before, client_before = processes.cpu_seconds(pids), children_cpu()
    result = run_wrk(label, script, servers[0].url, seconds=seconds, **options)
    elapsed = result.figures["seconds"]
    result.figures["server_cores"] = (processes.cpu_seconds(pids) - cpu_before) / elapsed
    result.figures["client_cores"] = (children_cpu() - client_before) / elapsed
    for name, output, spy in spies:
        spy.wait(60)
        console.print(f"  py-spy of {name} -> {output}")
        for line in processes.summarize(output).lines():
            console.print(f"    {line}")
    return result


def children_cpu() -> float:
    """CPU seconds of this process's finished children (the wrk runs; the servers still run)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def http_pair(
    args: argparse.Namespace, label: str, script: str, service: list[Service], bare: Service
) -> tuple[WrkResult, WrkResult]:
    """The same wrk script on the bare app, then on the service (``service[0]`` serves
    HTTP; the others, e.g. the projector, count for CPU and profiles): a 2 s warm-up each."""
    tag = uuid.uuid4().hex[:8]
    results = []
    for name, servers in (("bare", [bare]), ("orderstream", service)):
        console.print(f"  {name}: warm-up 2 s, then {args.duration:.0f} s of {script}.lua ...")
        options = {"connections": args.connections, "threads": args.threads}
        warm_up = {"tag": f"w{tag}{name}"}
        run_wrk(f"{label} warm-up", script, servers[0].url, seconds=2, **options, args=warm_up)
        results.append(
            measured_run(
                f"{label} {name}",
                script,
                servers,
                seconds=args.duration,
                py_spy=args.py_spy,
                profile=f"{script}-{name}",
                **options,
                args={"tag": tag + name},
            )
        )
    return results[1], results[0]


def scenario_place(setup: Setup, args: argparse.Namespace, report: Report, command: str = "api") -> None:
    label = f"(a) POST /orders, {args.connections} connections, `orderstream {command}`"
    console.rule(label)
    service = serve(setup) if command == "serve" else setup.orderstream("api", setup.data_dir(), free_port())
    bare = setup.bare()
    with running(bare, service):
        seed(service.url, catalogue())
        ours, ref = http_pair(args, label, "place", [service], bare)
    compare(report, label, ours, ref)


def scenario_place_serve(setup: Setup, args: argparse.Namespace, report: Report) -> None:
    """(a) on ``orderstream serve``: the projections and sagas share the process set."""
    scenario_place(setup, args, report, command="serve")


def scenario_mixed(setup: Setup, args: argparse.Namespace, report: Report) -> None:
    label = "(b) mixed (place/get/search/patch/delete), `orderstream api` + `project`"
    console.rule(label)
    data_dir = setup.data_dir()
    api = setup.orderstream("api", data_dir, free_port())
    projector = setup.orderstream("project", data_dir, None)
    bare = setup.bare()
    with running(bare, api, projector):
        seed(api.url, catalogue())
        ours, ref = http_pair(args, label, "mixed", [api, projector], bare)
        sent = ours.figures.get("sent", {})
        console.print(f"  requests sent by kind: {dict(sorted(sent.items()))}")
    compare(report, label, ours, ref)


def serve(setup: Setup) -> Service:
    """``orderstream serve``. Without ``TEMPORAL_ADDRESS`` it starts the Temporal dev
    server; on free ports of its own (``ORDERSTREAM_TEMPORAL_DEV_PORT``/``_UI_PORT``),
    so that another dev server on this machine (someone else's ``serve``, on the
    default 7233) neither takes our workflows nor makes the run fail."""
    if not os.environ.get("TEMPORAL_ADDRESS"):
        os.environ["ORDERSTREAM_TEMPORAL_DEV_PORT"] = str(free_port())
        os.environ["ORDERSTREAM_TEMPORAL_UI_PORT"] = str(free_port())
    return setup.orderstream("serve", setup.data_dir(), free_port())


def stock_line(client: httpx.Client, sku: str) -> str:
    product = client.get(f"/products/{sku}").json()
    return f"on hand {product['on_hand']}, reserved {product['reserved']}, available {product['available']}"


def saga_lag(client: httpx.Client) -> str:
    """What ``/ready`` says beyond the stores and projections (saga lag, where reported)."""
    body = client.get("/ready").json()
    known = {"status", "event_store", "read_store", "head_position", "projections"}
    extra = {k: v for k, v in body.items() if k not in known}
    return json.dumps(extra) if extra else "(not reported by /ready)"


def scenario_burst(setup: Setup, args: argparse.Namespace, report: Report) -> None:
    orders, stock = args.burst_orders, args.burst_stock
    label = f"(c) {orders} orders at once on ONE SKU with {stock} in stock, `orderstream serve`"
    console.rule(label)
    service = serve(setup)
    sku = "BENCH-BURST"
    with (
        running(service),
        status_client(service.url) as client,
    ):
        seed(service.url, {sku: stock})
        threads = min(args.threads, orders)
        console.print(f"  {orders} POST /orders over {orders} connections ...")
        started = time.monotonic()
        result = run_wrk_until_done(
            label,
            "burst",
            service.url,
            threads=threads,
            connections=orders,
            args={"tag": uuid.uuid4().hex[:8], "sku": sku, "orders": orders // threads},
        )
        created = result.statuses.get(201, 0)
        last_201 = float(result.figures["last_created"]) or time.monotonic()
        console.print(
            f"  {created} accepted (201) in {last_201 - started:.1f} s; statuses "
            f"{dict(sorted(result.statuses.items()))}; p50 {result.figures['p50_ms']:.0f} ms, "
            f"p99 {result.figures['p99_ms']:.0f} ms"
        )
        final = wait_settled(client, created, args.settle_timeout, "orders")
        settled = final.open == 0 and final.total >= created
        after = final.at - last_201
        stock_now = stock_line(client, sku)
    shipped, rejected = final.statuses.get("shipped", 0), final.statuses.get("rejected", 0)
    console.print(f"  shipped {shipped}, rejected {rejected}; {sku}: {stock_now}")
    timing = f"all terminal {after:.1f} s after the last 201" if settled else f"{final.open} not terminal"
    target = f"{stock} shipped, {orders - stock} rejected, stock 0/0/0, within 30 s"
    console.print(f"  {timing} (target: {target})")
    report.sagas.append((label, f"shipped {shipped}, rejected {rejected}; {stock_now}; {timing}", target))


def status_client(url: str) -> httpx.Client:
    """The client that reads the order statuses while a saga scenario runs: a new
    connection per request. It polls every PROGRESS_EVERY (5) seconds, the server's
    keep-alive timeout (ORDERSTREAM_KEEP_ALIVE_TIMEOUT, 5 s): on a kept-alive connection
    the server's close and the next poll could cross, and the poll was reset."""
    limits = httpx.Limits(max_keepalive_connections=0)
    return httpx.Client(base_url=url, timeout=30, headers=bench_auth.headers(url), limits=limits)


def scenario_paced(setup: Setup, args: argparse.Namespace, report: Report) -> None:
    rate, seconds = args.rate, args.paced_seconds
    label = f"(d) {rate:.0f} orders/s for {seconds:.0f} s, tok_approve, `orderstream serve`"
    console.rule(label)
    service = serve(setup)
    with (
        running(service),
        status_client(service.url) as client,
    ):
        seed(service.url, catalogue())
        console.print(f"  paced load for {seconds:.0f} s ...")
        started = time.monotonic()

        def progress() -> None:
            console.print(f"  {time.monotonic() - started:4.0f} s: {order_statuses(client)}")

        result = measured_run(
            label,
            "paced",
            [service],
            seconds=seconds,
            py_spy=args.py_spy,
            profile="paced-serve",
            connections=args.paced_connections,
            threads=args.threads,
            meanwhile=progress,
            args={"tag": uuid.uuid4().hex[:8], "rate": rate, "threads": args.threads},
        )
        stopped = time.monotonic()
        at_stop = order_statuses(client)
        console.print(f"  load done: {show(result)}; read model: {at_stop}")
        console.print(f"  /ready beyond the stores: {saga_lag(client)}")
        created = result.statuses.get(201, 0)
        final = wait_settled(client, created, args.settle_timeout, "orders")
    load_seconds = stopped - started
    accepted_rate = created / load_seconds
    shipped_at_stop = at_stop.statuses.get("shipped", 0)
    draining = final.statuses.get("shipped", 0) - shipped_at_stop
    drain_rate = draining / (final.at - at_stop.at) if final.at > at_stop.at else float("nan")
    settled = final.open == 0 and final.total >= created
    waited = final.at - stopped
    lag = f"lag 0 {waited:.1f} s after" if settled else f"lag not 0 {waited:.0f} s after"
    measured = (
        f"accepted {accepted_rate:.1f}/s; reached shipped {shipped_at_stop / load_seconds:.1f}/s during "
        f"the load, {drain_rate:.1f}/s after it; {lag} the load"
    )
    console.print(f"  {measured}; at the end: {final}")
    report.sagas.append((label, measured, f"offered {rate:.0f}/s; target lag 0 within 10 s"))


def summary(report: Report, setup: Setup) -> None:
    console.rule("summary")
    if report.http:
        console.print(http_table(report))
    if report.sagas:
        sagas = Table(title="bench.load: through the sagas")
        for column in ("scenario", "measured", "target / offered"):
            sagas.add_column(column)
        for row in report.sagas:
            sagas.add_row(*row)
        console.print(sagas)
    for failure in report.failed:
        console.print(f"[red]failed: {failure}[/red]")
    console.print(
        f"bare app runner: {setup.runner}, {setup.bare_workers} worker(s); service options: "
        f"{' '.join(setup.service_args) or '(defaults)'}; installed: {server_extras()}"
    )


def http_table(report: Report) -> Table:
    table = Table(title="bench.load: orderstream beside the bare Litestar + msgspec app, same run")
    columns = ("scenario", "contender", "req/s", "p50 ms", "p99 ms", "non-2xx (5xx)", "server cores")
    for column in (*columns, "req/CPU-s", "ratio req/s", "ratio req/CPU-s"):
        table.add_column(column)
    for label, ours, bare in report.http:
        for result in (ours, bare):
            f = result.figures
            is_ours = result is ours
            table.add_row(
                label if is_ours else "",
                "orderstream" if is_ours else "bare app",
                f"{result.rps:,.0f}",
                f"{f['p50_ms']:.1f}",
                f"{f['p99_ms']:.1f}",
                f"{result.non_2xx} ({result.server_errors})",
                f"{f.get('server_cores', float('nan')):.2f}",
                f"{result.per_cpu_second:,.0f}",
                f"{ratio(ours.rps, bare.rps):.2f}x" if is_ours else "",
                f"{ratio(ours.per_cpu_second, bare.per_cpu_second):.2f}x" if is_ours else "",
            )
    return table


def server_extras() -> str:
    import importlib.util

    names = ("httptools", "uvloop", "granian")
    return ", ".join(f"{n} {'yes' if importlib.util.find_spec(n) else 'no'}" for n in names)


def workers_option(service_args: list[str]) -> int:
    """The N of ``--workers N`` / ``--workers=N`` among the service's options, else 1:
    the bare app gets as many server processes as the service."""
    for i, arg in enumerate(service_args):
        name, _, value = arg.partition("=")
        if name == "--workers":
            given = value or (service_args[i + 1] if i + 1 < len(service_args) else "")
            return int(given) if given.isdigit() else 1
    return 1


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help="comma-separated subset (default all)"
    )
    parser.add_argument("--duration", type=float, default=10, help="seconds per HTTP run (default 10)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    parser.add_argument("--runner", choices=("uvicorn", "granian"), default="uvicorn", help="bare app server")
    parser.add_argument(
        "--bare-workers",
        type=int,
        default=None,
        help="bare app server processes (default: the --workers given with --service-arg, else 1)",
    )
    parser.add_argument(
        "--service-arg",
        action="append",
        default=[],
        help="extra option for `orderstream api/serve` (repeat), e.g. --service-arg=--workers=2",
    )
    parser.add_argument(
        "--service-src",
        type=Path,
        default=None,
        metavar="DIR",
        help="run orderstream from this src dir (e.g. another worktree's), same bench code",
    )
    parser.add_argument("--burst-orders", type=int, default=500)
    parser.add_argument("--burst-stock", type=int, default=250)
    parser.add_argument("--rate", type=float, default=100, help="paced orders/s (default 100)")
    parser.add_argument("--paced-seconds", type=float, default=60)
    parser.add_argument("--paced-connections", type=int, default=64)
    parser.add_argument(
        "--py-spy", type=Path, default=None, metavar="DIR", help="profile each server run into DIR (py-spy)"
    )
    parser.add_argument("--settle-timeout", type=float, default=60, help="max wait for the sagas (s)")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown or not chosen:
        parser.error(f"--scenarios: choose from {', '.join(SCENARIOS)}")
    if args.burst_orders % args.threads:
        parser.error("--burst-orders must be a multiple of --threads")
    wrk_path()
    if args.py_spy is not None:
        processes.py_spy()
        args.py_spy.mkdir(parents=True, exist_ok=True)
    runs = {
        "place": scenario_place,
        "place-serve": scenario_place_serve,
        "mixed": scenario_mixed,
        "burst": scenario_burst,
        "paced": scenario_paced,
    }
    report = Report()
    with tempfile.TemporaryDirectory(prefix="bench-load-") as workdir:
        workers = args.bare_workers or workers_option(args.service_arg)
        setup = Setup(Path(workdir), tuple(args.service_arg), args.runner, workers, args.service_src)
        for name in SCENARIOS:
            if name in chosen:
                try:
                    runs[name](setup, args, report)
                except (RuntimeError, httpx.HTTPError, subprocess.SubprocessError) as exc:
                    console.print(f"[red]{name} failed: {exc}[/red]")
                    report.failed.append(f"{name}: {str(exc).splitlines()[0]}")
    summary(report, setup)
    if report.failed:
        sys.exit(1)


if __name__ == "__main__":
    cli()
