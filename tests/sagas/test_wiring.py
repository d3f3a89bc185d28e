"""The fulfilment saga as the composition root registers it, and its services as
``orderstream serve`` / ``worker`` run them."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from temporalio.testing import WorkflowEnvironment

from orderstream.api.app import create_app
from orderstream.application.commands import CommandContext
from orderstream.application.use_cases import LineRequest
from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.domain import inventory
from orderstream.domain.common import Money
from orderstream.sagas.fulfilment.inputs import CORRELATION_ID_ATTRIBUTE, ORDER_ID_ATTRIBUTE, workflow_id_for
from orderstream.sagas.fulfilment.saga import FulfilmentSaga
from orderstream.sagas.fulfilment.settings import FulfilmentSettings
from orderstream.sagas.runtime import TemporalSettings
from orderstream.services import run_services
from tests.sagas.conftest import ADDRESS, WAIT
from tests.tokens import admin_headers

pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session")]


async def test_the_saga_runs_worker_and_trigger_and_serves_status(
    temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    address = temporal_env.client.service_client.config.target_host
    temporal = TemporalSettings(address=address, web_ui_url="http://ui.example:8080")
    saga = FulfilmentSaga(FulfilmentSettings(temporal=temporal, task_queue=f"test-{uuid.uuid4().hex}"))
    container = await build(Settings(data_dir=tmp_path), saga=saga)
    assert container.saga is saga
    stop = asyncio.Event()
    try:
        services = await saga.services(container)
        assert [s.name for s in services] == ["sagas"]
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
        handle = cast("Any", saga.link).client.get_workflow_handle(workflow_id_for(order_id))
        result = None
        async with asyncio.timeout(WAIT):
            while result is None:
                try:
                    result = await handle.result()
                except Exception:
                    await asyncio.sleep(0.1)  # not started yet
        assert result["status"] == "shipped"
        attributes = (await handle.describe()).typed_search_attributes
        assert attributes.get(ORDER_ID_ATTRIBUTE) == order_id
        assert attributes.get(CORRELATION_ID_ATTRIBUTE) == ctx.correlation_id

        transport = httpx.ASGITransport(app=cast("Any", create_app(container)))
        async with httpx.AsyncClient(
            transport=transport, base_url="http://test", headers=admin_headers(container.settings)
        ) as http:
            view = (await http.get(f"/orders/{order_id}/fulfilment")).json()
        assert view["status"] == "completed"
        assert view["outcome"]["status"] == "shipped"
        workflow_id = workflow_id_for(order_id)
        assert view["web_ui_url"] == f"http://ui.example:8080/namespaces/default/workflows/{workflow_id}"
    finally:
        stop.set()
        if "running" in locals():
            await asyncio.wait_for(running, WAIT)
        await container.close()


async def test_with_worker_processes_the_sagas_run_in_a_child_that_drains_on_stop(
    temporal_env: WorkflowEnvironment, tmp_path: Path
) -> None:
    address = temporal_env.client.service_client.config.target_host
    settings = FulfilmentSettings(
        temporal=TemporalSettings(address=address), task_queue=f"test-{uuid.uuid4().hex}", worker_processes=1
    )
    saga = FulfilmentSaga(settings)
    container = await build(Settings(data_dir=tmp_path), saga=saga)
    stop = asyncio.Event()
    try:
        services = await saga.services(container)
        assert [s.name for s in services] == ["sagas", "saga-worker-1"]
        assert not cast("Any", services[0]).with_worker  # only the child polls the task queue
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
        handle = cast("Any", saga.link).client.get_workflow_handle(workflow_id_for(placed.state.order_id))
        result = None
        async with asyncio.timeout(WAIT):
            while result is None:
                try:
                    result = await handle.result()
                except Exception:
                    await asyncio.sleep(0.1)  # not started yet
        assert result["status"] == "shipped"
        stock = await container.handler.load(inventory.decider, inventory.stream_name("MUG"))
        assert (stock.state.on_hand, stock.state.reserved) == (4, 0)  # committed by the child
    finally:
        stop.set()
        if "running" in locals():
            await asyncio.wait_for(running, WAIT)  # raises if the child did not exit on SIGTERM
        await container.close()
