"""The ``orderstream`` process: serve, graceful shutdown, and the operator commands."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.domain import orders
from orderstream.sagas.fulfilment.inputs import workflow_id_for
from projections import product_stock
from tests.api.helpers import order_body
from tests.served import served
from tests.tokens import admin_headers

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ORDERSTREAM_", "TEMPORAL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def orderstream(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orderstream.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        check=False,
    )


def start_server(data_dir: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orderstream.cli",
            "serve",
            "--no-sagas",
            "--port",
            "0",
            "--data-dir",
            str(data_dir),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", line)
        if found:
            return process, found.group(1)
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError("orderstream serve did not start")


async def test_sigterm_loses_no_acknowledged_event(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    process, url = start_server(data_dir)
    acknowledged: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30, headers=admin_headers(data_dir)) as client:
            r = await client.post(
                "/products", json={"sku": "SKU-1", "name": "Mug", "price": {"amount": 100, "currency": "EUR"}}
            )
            assert r.status_code == 201
            assert (await client.post("/products/SKU-1/stock", json={"quantity": 100000})).status_code == 200

            async def place(i: int) -> None:
                await asyncio.sleep(i * 0.002)
                try:
                    r = await client.post("/orders", json=order_body(customer_id=f"c-{i}"))
                except httpx.HTTPError:
                    return  # refused once the server stopped accepting: never acknowledged
                if r.status_code == 201:
                    acknowledged.append(r.json()["id"])

            async def terminate() -> None:
                await asyncio.sleep(0.15)
                process.send_signal(signal.SIGTERM)

            await asyncio.gather(*(place(i) for i in range(150)), terminate())
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.stdout is not None
    assert "stopped" in process.stdout.read()
    assert acknowledged, "no request got through before the shutdown"

    container = await build(Settings(data_dir=data_dir))
    try:
        for order_id in acknowledged:
            events = await container.event_store.read_stream(orders.stream_name(order_id))
            assert [e.type for e in events] == ["OrderPlaced"], order_id
    finally:
        await container.close()


async def test_serve_says_how_to_get_a_token_and_tokens_issue_prints_one(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    process, url = start_server(data_dir)
    try:
        assert process.stdout is not None
        announced = process.stdout.readline() + process.stdout.readline()
        assert f"orderstream tokens issue --data-dir {data_dir} --role admin" in announced
        key = data_dir / "auth" / "signing-key.jwk"
        assert key.stat().st_mode & 0o777 == 0o600  # created on first start, owner only
        issued = orderstream(
            "tokens", "issue", "--data-dir", str(data_dir), "--role", "customer", "--customer-id", "cust-9"
        )
        assert issued.returncode == 0, issued.stderr
        token = issued.stdout.splitlines()[-1]
        customer = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            assert (await client.get("/orders")).status_code == 401
            assert (await client.get("/orders", headers=customer)).status_code == 200
            stock = await client.post("/products/SKU-1/stock", json={"quantity": 1}, headers=customer)
            assert stock.status_code == 403
        refused = orderstream("tokens", "issue", "--data-dir", str(data_dir), "--role", "root")
        assert refused.returncode == 2
    finally:
        process.terminate()
        process.wait(timeout=60)


async def test_serve_no_auth_lets_everyone_in_and_says_so(tmp_path: Path) -> None:
    process, url = start_server(tmp_path / "data", "--no-auth")  # its API workers too
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            product = {"sku": "SKU-1", "name": "Mug", "price": {"amount": 100, "currency": "EUR"}}
            assert (await client.post("/products", json=product)).status_code == 201
            ready = (await client.get("/ready")).json()
            assert ready["auth"] == "off"
            assert "AUTHENTICATION IS OFF" in ready["warning"]
    finally:
        process.terminate()
        process.wait(timeout=60)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["serve", "--help"],
        ["projections", "--help"],
        ["events", "--help"],
        ["tokens", "issue", "--help"],
    ],
)
def test_help(args: list[str]) -> None:
    result = orderstream(*args)
    assert result.returncode == 0, result.stderr
    assert "Usage" in result.stdout


async def test_operator_commands(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    container = await build(Settings(data_dir=data_dir))
    try:
        from orderstream.application.commands import CommandContext
        from orderstream.domain.common import Money

        await container.use_cases.register_product("SKU-1", "Mug", Money(100, "EUR"), CommandContext())
        await container.use_cases.add_stock("SKU-1", 5, CommandContext())
    finally:
        await container.close()
    common = ["--data-dir", str(data_dir), "--log-level", "warning"]

    read = orderstream("events", "read", "product-SKU-1", *common)
    assert read.returncode == 0, read.stderr
    lines = [json.loads(line) for line in read.stdout.splitlines()]
    assert [line["type"] for line in lines] == ["ProductRegistered", "StockAdded"]

    tail = orderstream("events", "tail", "--from-start", "--no-follow", "--type", "StockAdded", *common)
    assert [json.loads(line)["type"] for line in tail.stdout.splitlines()] == ["StockAdded"]

    follow = orderstream("events", "tail", "--from-start", "--limit", "2", *common)
    assert follow.returncode == 0, follow.stderr
    assert len(follow.stdout.splitlines()) == 2

    rebuilt = orderstream("projections", "rebuild", "products", *common)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilt" in rebuilt.stdout

    status = orderstream("projections", "status", "--json", *common)
    assert status.returncode == 0, status.stderr
    by_name = {s["name"]: s for s in map(json.loads, status.stdout.splitlines())}
    assert set(by_name) == {"orders", "products"}
    assert by_name["products"]["physical"].startswith(f"products_v{product_stock.SCHEMA.version}")

    parked = orderstream("projections", "parked", "products", *common)
    assert parked.returncode == 0, parked.stderr
    assert parked.stdout == ""
    replay = orderstream("projections", "replay-parked", "products", *common)
    assert replay.returncode == 0, replay.stderr
    assert "0 parked events" in replay.stdout

    unknown = orderstream("projections", "rebuild", "nope", *common)
    assert unknown.returncode == 2
    assert "known: orders, products" in unknown.stderr


def test_a_rebuild_with_the_read_store_down_says_so_in_a_line(tmp_path: Path) -> None:
    """Not a 64-line traceback (hostile run, Elasticsearch stopped mid-rebuild)."""
    down = "http://127.0.0.1:9"  # nothing listens on the discard port
    args = ["projections", "rebuild", "products", "--data-dir", str(tmp_path / "d"), "--read-store", down]
    failed = orderstream(*args)
    assert failed.returncode == 1, failed.stderr
    assert "rebuilding products failed, the alias was left as it was" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_what_orderstream_writes_is_its_users_alone(tmp_path: Path) -> None:
    """The stores hold customers' names and addresses: no other user of the machine may
    read them (they were created 0644 under the usual umask 022)."""
    data_dir = tmp_path / "data"
    result = orderstream("events", "read", "order-x", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    written = [data_dir, *data_dir.iterdir()]
    assert {p.name for p in written} >= {"data", "events.db", "read.db"}
    for path in written:
        mode = path.stat().st_mode & 0o777
        assert mode & 0o077 == 0, (path.name, oct(mode))


@pytest.mark.temporal
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="serve runs one process below 2 cores")
def test_every_api_worker_of_serve_links_to_the_dev_servers_web_ui(tmp_path: Path) -> None:
    """``serve`` gives its API worker processes the dev server's address; they also
    need to know that its Web UI runs here (they answered ``web_ui_url: null``)."""
    with served(tmp_path, workers=None) as serve, serve.client() as client:
        order_id = serve.place_and_ship(client)
        links = set()
        for _ in range(8):  # new connections: the kernel spreads them over the API workers
            response = client.get(f"/orders/{order_id}/fulfilment", headers={"Connection": "close"})
            assert response.status_code == 200, response.text
            links.add(response.json()["web_ui_url"])
    assert links == {f"{serve.web_ui}/namespaces/default/workflows/{workflow_id_for(order_id)}"}
