"""Temporal down when the service starts (issue 12, item 1, worker side).

The real dev server is started and stopped (its port now refuses), the saga
services start against it anyway (what ``serve`` / ``worker`` run), ``/ready``
says Temporal is missing, an order is accepted; then the dev server starts
again on the same port and state file, the services connect by themselves and
the order ships.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from orderstream.api.app import create_app
from orderstream.api.ops import PROBE_TIMEOUT
from orderstream.application.commands import CommandContext
from orderstream.application.use_cases import LineRequest
from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.domain.common import Money
from orderstream.sagas.fulfilment.inputs import SEARCH_ATTRIBUTES, workflow_id_for
from orderstream.sagas.fulfilment.saga import FulfilmentSaga
from orderstream.sagas.fulfilment.settings import FulfilmentSettings
from orderstream.sagas.runtime import TemporalSettings, start_dev_server
from orderstream.services import run_services
from tests.sagas.conftest import ADDRESS, WAIT, eventually
from tests.tokens import admin_headers

pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session")]


def _saga(port: int) -> FulfilmentSaga:
    temporal = TemporalSettings(address=f"127.0.0.1:{port}")
    return FulfilmentSaga(FulfilmentSettings(temporal=temporal, task_queue=f"test-{uuid.uuid4().hex}"))


def _dev_server_pid(port: int) -> int:
    """The pid of the dev server listening on ``port`` (``temporal server start-dev --port N``)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "start-dev" in argv and "--port" in argv and argv[argv.index("--port") + 1 :][:1] == [str(port)]:
            found.append(int(entry.name))
    assert len(found) == 1, found
    return found[0]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_sagas_start_while_temporal_is_down_and_connect_when_it_is_back(
    tmp_path: Path,
) -> None:
    port = _free_port()
    temporal_dir = tmp_path / "temporal"
    _address, dev_server = await start_dev_server(
        temporal_dir, port=port, ui=False, search_attributes=SEARCH_ATTRIBUTES
    )
    await dev_server.shutdown()  # the real server, stopped: its port refuses connections
    saga = _saga(port)
    container = await build(Settings(data_dir=tmp_path / "data"), saga=saga)
    stop = asyncio.Event()
    running: asyncio.Task[None] | None = None
    dev_server = None
    transport = httpx.ASGITransport(app=cast("Any", create_app(container)))
    http = httpx.AsyncClient(
        transport=transport, base_url="http://test", timeout=WAIT, headers=admin_headers(container.settings)
    )
    try:
        services = await saga.services(container)  # does not raise: Temporal is down
        running = asyncio.create_task(run_services(services, stop))
        ctx = CommandContext(actor="test")
        await container.use_cases.register_product("MUG", "mug", Money(100, "EUR"), ctx)
        await container.use_cases.add_stock("MUG", 5, ctx)
        placed = await container.use_cases.place_order(
            customer_id="c",
            lines=[LineRequest("MUG", 1)],
            shipping_address=ADDRESS,
            payment_token="tok_approve",
            context=ctx,
        )
        order_id = placed.state.order_id

        ready = await http.get("/ready")
        assert ready.status_code == 200, ready.text  # the stores answer: the API is ready
        temporal = ready.json()["sagas"]["temporal"]
        assert (temporal["status"], temporal["address"]) == ("connecting", f"127.0.0.1:{port}")
        assert temporal["attempts"] >= 1
        assert "refused" in temporal["last_error"].lower()
        assert (await http.get(f"/orders/{order_id}/fulfilment")).status_code == 503
        assert not running.done()

        _address, dev_server = await start_dev_server(
            temporal_dir, port=port, ui=False, search_attributes=SEARCH_ATTRIBUTES
        )

        async def connected() -> bool:
            body = (await http.get("/ready")).json()
            return bool(body["sagas"]["temporal"]["status"] == "connected")

        await eventually(connected, what="the saga services to connect")

        async def shipped() -> bool:
            view = await http.get(f"/orders/{order_id}/fulfilment")  # 503 until the client is shared
            return view.status_code == 200 and view.json()["step"] == "shipped"

        await eventually(shipped, what="the order placed during the outage to ship")
        handle = cast("Any", saga.link).client.get_workflow_handle(workflow_id_for(order_id))
        assert (await handle.result())["status"] == "shipped"
        assert not running.done()
    finally:
        stop.set()
        if running is not None:
            await asyncio.wait_for(running, WAIT)
        await http.aclose()
        await container.close()
        if dev_server is not None:
            await dev_server.shutdown()


async def test_the_sagas_survive_temporal_going_away_and_coming_back(
    tmp_path: Path,
) -> None:
    port = _free_port()
    temporal_dir = tmp_path / "temporal"
    _address, dev_server = await start_dev_server(
        temporal_dir, port=port, ui=False, search_attributes=SEARCH_ATTRIBUTES
    )
    saga = _saga(port)
    container = await build(Settings(data_dir=tmp_path / "data"), saga=saga)
    stop = asyncio.Event()
    running: asyncio.Task[None] | None = None
    transport = httpx.ASGITransport(app=cast("Any", create_app(container)))
    http = httpx.AsyncClient(
        transport=transport, base_url="http://test", timeout=WAIT, headers=admin_headers(container.settings)
    )
    ctx = CommandContext(actor="test")

    async def place() -> str:
        placed = await container.use_cases.place_order(
            customer_id="c",
            lines=[LineRequest("MUG", 1)],
            shipping_address=ADDRESS,
            payment_token="tok_approve",
            context=ctx,
        )
        return placed.state.order_id

    async def shipped(order_id: str) -> None:
        async def check() -> bool:
            view = await http.get(f"/orders/{order_id}/fulfilment")
            return view.status_code == 200 and view.json()["step"] == "shipped"

        await eventually(check, within=60, what=f"order {order_id} to ship")

    try:
        running = asyncio.create_task(run_services(await saga.services(container), stop))
        await container.use_cases.register_product("MUG", "mug", Money(100, "EUR"), ctx)
        await container.use_cases.add_stock("MUG", 5, ctx)
        await shipped(await place())

        await dev_server.shutdown()
        dev_server = None
        during = await place()  # accepted while Temporal is down
        await asyncio.sleep(5)
        assert not running.done(), "the saga services stopped while Temporal was down"
        _address, dev_server = await start_dev_server(
            temporal_dir, port=port, ui=False, search_attributes=SEARCH_ATTRIBUTES
        )

        await shipped(during)
        await shipped(await place())
        assert not running.done()
    finally:
        stop.set()
        if running is not None:
            await asyncio.wait_for(running, WAIT)
        await http.aclose()
        await container.close()
        if dev_server is not None:
            await dev_server.shutdown()


async def test_a_hung_temporal_costs_ready_and_metrics_one_probe_timeout(tmp_path: Path) -> None:
    """A Temporal that hangs (stopped, not gone: its port still accepts) made /ready and
    /metrics wait for the connection check and then again for the count of running
    sagas: twice the 2 s probe timeout. Found in a hostile run with SIGSTOP; made here
    the same way."""
    port = _free_port()
    _address, dev_server = await start_dev_server(
        tmp_path / "temporal", port=port, ui=False, search_attributes=SEARCH_ATTRIBUTES
    )
    saga = _saga(port)
    container = await build(Settings(data_dir=tmp_path / "data"), saga=saga)
    stop = asyncio.Event()
    running = asyncio.create_task(run_services(await saga.services(container), stop))
    transport = httpx.ASGITransport(app=cast("Any", create_app(container)))
    http = httpx.AsyncClient(
        transport=transport, base_url="http://test", timeout=WAIT, headers=admin_headers(container.settings)
    )
    pid = _dev_server_pid(port)
    try:

        async def connected() -> bool:
            body = (await http.get("/ready")).json()
            return bool(body["sagas"]["temporal"]["status"] == "connected")

        await eventually(connected, what="the saga services to connect")
        client = cast("Any", saga.client)
        counted = 0
        count = client.running_workflows

        async def counting() -> int:
            nonlocal counted
            counted += 1
            return int(await count())

        client.running_workflows = counting
        os.kill(pid, signal.SIGSTOP)
        try:
            for path in ("/ready", "/metrics"):
                started = time.monotonic()
                answer = await http.get(path)
                took = time.monotonic() - started
                assert answer.status_code == 200, answer.text
                assert took < PROBE_TIMEOUT + 1.5, (path, took)  # was twice the timeout, ~4 s
            # Unknown, not the count from before the outage.
            assert "orderstream_saga_workflows_running NaN" in (await http.get("/metrics")).text
            ready = (await http.get("/ready")).json()
            assert ready["sagas"]["temporal"]["status"] == "unreachable"
            assert ready["sagas"]["workflows_running"] is None
            assert counted == 0  # the link failed its check: no second wait on it
        finally:
            os.kill(pid, signal.SIGCONT)
        await eventually(connected, what="the link to come back after SIGCONT")
        assert counted >= 1
        assert "orderstream_saga_workflows_running 0.0" in (await http.get("/metrics")).text
    finally:
        stop.set()
        await asyncio.wait_for(running, WAIT)
        await http.aclose()
        await container.close()
        await dev_server.shutdown()
