"""Issue 12 item 4: one event a projection cannot apply (a poison event).

It parks; the parked event is visible per group (``orderstream projections status``,
``/ready``, ``/metrics``); a read-your-writes query past it answers at once with a
problem naming it (before: 503 after the consistency timeout, for ever); an operator
skips it, recorded with who and why, after which the query answers again; and
``replay-parked`` delivers a parked event again. Real SQLite stores, the real CLI.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from orderstream.container import Container
from orderstream.eventstore.base import ANY, NackAction, NewEvent, SubscriptionGroupNotFound
from orderstream.sagas.fulfilment.trigger import GROUP as SAGA_GROUP
from orderstream.sagas.fulfilment.trigger import group_settings
from tests.api.helpers import assert_problem, order_body, place_order, register_product
from tests.conftest import MakeClient

WAIT = 20.0


def orderstream(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORDERSTREAM_LOG_LEVEL": "warning"}
    return subprocess.run(
        [sys.executable, "-m", "orderstream.cli", *args, "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        if await check():
            return
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def append_poison(container: Container, sku: str) -> int:
    """A ``StockAdded`` without a quantity: the products projection cannot fold it."""
    poison = NewEvent(
        id=uuid.uuid4(),
        type="StockAdded",
        data=json.dumps({"sku": sku, "at": "2024-05-01T00:00:00Z"}).encode(),
    )
    return (await container.event_store.append(f"product-{sku}", [poison], ANY)).position


async def parked_in(container: Container, group: str) -> int:
    try:
        return (await container.event_store.subscription_group_info(group)).parked
    except SubscriptionGroupNotFound:
        return 0


async def test_a_poison_event_is_visible_blocks_reads_past_it_at_once_and_can_be_skipped(
    make_client: MakeClient, tmp_path: Path
) -> None:
    data_dir = tmp_path / "poison"
    async with make_client(data_dir=data_dir, consistency_timeout=30.0) as (http, container):
        group = container.runners["products"].group
        await register_product(http, "GOOD", stock=3)
        poison_at = await append_poison(container, "GOOD")
        await eventually(lambda: _is(parked_in(container, group), 1), "the poison event parked")
        later = await register_product(http, "LATER", stock=2)

        # Read-your-writes past the parked event: at once, naming it (not 503 after 30 s).
        response = await asyncio.wait_for(
            http.get("/products", params={"min_position": later["position"]}), WAIT
        )
        problem = assert_problem(response, 503, "parked-event-blocks")
        assert "Retry-After" not in response.headers
        assert (problem["parked_position"], problem["parked_stream"]) == (poison_at, "product-GOOD")
        assert (problem["group"], problem["projection"]) == (group, "products")
        # A document read of another stream still answers (its own position tells).
        assert (
            await http.get("/products/LATER", params={"min_position": later["position"]})
        ).status_code == 200

        ready = (await http.get("/ready")).json()
        products = ready["projections"]["products"]
        assert (products["parked"], products["oldest_parked_position"], products["state"]) == (
            1,
            poison_at,
            "parked",
        )
        metrics = (await http.get("/metrics")).text
        assert 'orderstream_projection_parked{projection="products"} 1.0' in metrics

        status = orderstream(data_dir, "projections", "status", "--json")
        assert status.returncode == 0, status.stderr
        by_name = {s["name"]: s for s in map(json.loads, status.stdout.splitlines())}
        assert (by_name["products"]["parked"], by_name["products"]["oldest_parked_position"]) == (
            1,
            poison_at,
        )

        refused = orderstream(
            data_dir, "projections", "skip", "products", str(poison_at + 1000), "--reason", "x"
        )
        assert refused.returncode != 0
        assert "no parked event" in refused.stderr
        skipped = orderstream(
            data_dir,
            "projections",
            "skip",
            "products",
            str(poison_at),
            "--reason",
            "hand-written",
            "--actor",
            "ops-ann",
        )
        assert skipped.returncode == 0, skipped.stderr
        assert "product-GOOD@2" in skipped.stdout

        record = orderstream(data_dir, "projections", "skipped", "products")
        (line,) = map(json.loads, record.stdout.splitlines())
        assert (line["position"], line["actor"], line["reason"]) == (poison_at, "ops-ann", "hand-written")
        assert "quantity" in line["parked_reason"]

        # Skipped: the read model is declared to do without it, and reads past it answer.
        assert await parked_in(container, group) == 0
        answered = await http.get("/products", params={"min_position": later["position"]})
        assert answered.status_code == 200, answered.text
        assert {p["sku"] for p in answered.json()["items"]} == {"GOOD", "LATER"}
        assert (await http.get("/ready")).json()["projections"]["products"]["parked"] == 0


async def _is(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)


async def test_the_saga_triggers_group_is_listed_replayed_and_skipped_from_the_cli(
    make_client: MakeClient, tmp_path: Path
) -> None:
    """Before: ``replay-parked saga-order-fulfilment`` said "no projection"."""
    data_dir = tmp_path / "saga"
    async with make_client(data_dir=data_dir, projections=False) as (http, container):
        store = container.event_store
        await register_product(http, "MUG", stock=1)
        await store.ensure_subscription_group(SAGA_GROUP, group_settings())
        placed = await place_order(http, order_body(("MUG", 1)))
        subscription = await store.connect_subscription_group(SAGA_GROUP)
        try:
            async for event in subscription:  # the OrderPlaced: park it as the trigger would
                await subscription.nack(event, NackAction.PARK, "cannot be handled (test)")
                break
        finally:
            await subscription.close()

    status = orderstream(data_dir, "projections", "status", "--json")
    assert status.returncode == 0, status.stderr
    by_name = {s["name"]: s for s in map(json.loads, status.stdout.splitlines())}
    assert (by_name[SAGA_GROUP]["parked"], by_name[SAGA_GROUP]["state"]) == (1, "parked")
    assert by_name[SAGA_GROUP]["oldest_parked_position"] == placed["position"]

    parked = orderstream(data_dir, "projections", "parked", SAGA_GROUP)
    assert parked.returncode == 0, parked.stderr
    (line,) = map(json.loads, parked.stdout.splitlines())
    assert (line["type"], line["reason"]) == ("OrderPlaced", "cannot be handled (test)")

    replayed = orderstream(data_dir, "projections", "replay-parked", SAGA_GROUP)
    assert replayed.returncode == 0, replayed.stderr
    assert "1 parked events queued" in replayed.stdout
    async with make_client(data_dir=data_dir, projections=False) as (_http, container):
        info = await container.event_store.subscription_group_info(SAGA_GROUP)
        assert (info.parked, info.lag_events) == (0, 1)  # delivered again to the trigger
