"""Issue 12 item 1: a Temporal outage is not poison.

With Temporal down, the saga trigger used to nack each event after a back-off, each
redelivery counted, and after ``max_retry`` the events parked: orders stayed
``placed`` with no workflow after Temporal came back. Now the batch consumer keeps
the events (leases renewed) and hands them to Temporal again after a back-off,
without counting deliveries. Here the real Temporal dev server is stopped for many
ack timeouts with ``max_retry=2``, then started again on the same port and database:
nothing parks, and every order gets its workflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from orderstream.application.commands import CommandContext
from orderstream.application.use_cases import LineRequest
from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.container import Container
from orderstream.domain import orders
from orderstream.domain.common import Money
from orderstream.sagas.fulfilment.inputs import SEARCH_ATTRIBUTES, workflow_id_for
from orderstream.sagas.fulfilment.trigger import GROUP, SagaTrigger, group_settings
from orderstream.sagas.runtime import NAMESPACE, TemporalBinaryNotFound, start_dev_server, temporal_cli_path

pytestmark = pytest.mark.temporal

WAIT = 60.0
ADDRESS = orders.Address(name="Ada", line1="1 Main St", city="Utrecht", postal_code="3511", country="NL")
CTX = CommandContext(actor="test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        if await check():
            return
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


@pytest.fixture
async def container(tmp_path: Path) -> AsyncIterator[Container]:
    try:
        temporal_cli_path()
    except TemporalBinaryNotFound as exc:
        pytest.skip(str(exc))
    built = await build(Settings(data_dir=tmp_path / "data"))
    try:
        yield built
    finally:
        await built.close()


async def place(container: Container) -> str:
    result = await container.use_cases.place_order(
        customer_id="cust-1",
        lines=[LineRequest("MUG", 1)],
        shipping_address=ADDRESS,
        payment_token="tok_approve",
        context=CommandContext(actor="test", correlation_id=f"corr-{uuid.uuid4().hex[:8]}"),
    )
    return result.state.order_id


async def started(client: Client, order_id: str) -> bool:
    try:
        await client.get_workflow_handle(workflow_id_for(order_id)).describe()
    except RPCError:
        return False
    return True


async def test_a_temporal_outage_of_many_ack_timeouts_parks_nothing_and_every_order_gets_its_saga(
    container: Container, tmp_path: Path
) -> None:
    port = free_port()
    temporal_dir = tmp_path / "temporal"
    address, env = await start_dev_server(
        temporal_dir, port=port, ui=False, search_attributes=SEARCH_ATTRIBUTES
    )
    client = await Client.connect(address, namespace=NAMESPACE)
    await env.shutdown()  # Temporal is down from here on
    restarted: WorkflowEnvironment | None = None

    await container.use_cases.register_product("MUG", "Mug", Money(500, "EUR"), CTX)
    await container.use_cases.add_stock("MUG", 10, CTX)
    settings = group_settings(max_retry=2)
    settings = type(settings)(
        filter=settings.filter, from_position=None, max_retry=2, ack_timeout_seconds=1.0
    )
    trigger = SagaTrigger(
        container.event_store,
        client,
        f"q-{uuid.uuid4().hex[:6]}",
        settings=settings,
        retry_backoff=(0.1, 0.5),
    )
    stop = asyncio.Event()
    task = asyncio.create_task(trigger.run(stop))
    try:
        order_ids = [await place(container) for _ in range(4)]
        # Ten ack timeouts, five times max_retry: the old trigger parked everything by now.
        await asyncio.sleep(10.0)
        info = await container.event_store.subscription_group_info(GROUP)
        assert info.parked == 0
        assert info.lag_events >= len(order_ids)
        assert not task.done()

        restarted = (
            await start_dev_server(temporal_dir, port=port, ui=False, search_attributes=SEARCH_ATTRIBUTES)
        )[1]

        async def all_started() -> bool:
            return all([await started(client, order_id) for order_id in order_ids])

        await eventually(all_started, "a workflow for every order placed during the outage")
        await eventually(lambda: _drained(container), "the trigger's group drained")
        assert await container.event_store.list_parked(GROUP) == []
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, WAIT)
        if restarted is not None:
            await restarted.shutdown()


async def _drained(container: Container) -> bool:
    info = await container.event_store.subscription_group_info(GROUP)
    return info.lag_events == 0 and info.parked == 0
