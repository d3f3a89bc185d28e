"""Read-your-writes for one document while another stream has a parked event."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orderstream.application.commands import CommandHandler
from orderstream.application.projection_runner import ParkedEventBlocks, ProjectionRunner
from orderstream.application.queries import Queries
from orderstream.domain import inventory
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.base import ANY, NewEvent, SubscriptionGroupNotFound
from orderstream.eventstore.sqlite import SqliteEventStore
from orderstream.readstore.base import Document
from orderstream.readstore.sqlite import SqliteReadStore
from projections import product_stock

NOW = datetime(2024, 5, 1, tzinfo=UTC)


async def parked(events: SqliteEventStore, group: str) -> int:
    try:
        return (await events.subscription_group_info(group)).parked
    except SubscriptionGroupNotFound:  # the runner has not created its group yet
        return 0


async def test_a_parked_event_elsewhere_does_not_fail_a_document_read(tmp_path: Path) -> None:
    events = await SqliteEventStore.open(tmp_path / "events.db", poll_interval=0.05)
    reads = await SqliteReadStore.open(tmp_path / "read.db")
    runner = ProjectionRunner(events, reads, product_stock.projection, max_retry=2, ack_timeout_seconds=1.0)
    queries = Queries(
        event_store=events,
        read_store=reads,
        handler=CommandHandler(events, registry),
        trackers={"products": runner},
        consistency_timeout=3.0,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        registered = inventory.ProductRegistered(sku="BAD", name="x", price=Money(1, "EUR"), at=NOW)
        await events.append("product-BAD", [registry.to_new_event(registered, event_id=uuid.uuid4())], ANY)
        poison = NewEvent(
            id=uuid.uuid4(),
            type="StockAdded",
            data=json.dumps({"sku": "BAD", "at": NOW.isoformat()}).encode(),
        )
        await events.append("product-BAD", [poison], ANY)  # no quantity: the fold fails, then it is parked
        for _ in range(400):  # at most 20 s
            if await parked(events, runner.group):
                break
            await asyncio.sleep(0.05)
        assert await parked(events, runner.group) == 1

        ok = inventory.ProductRegistered(sku="OK", name="ok", price=Money(1, "EUR"), at=NOW)
        written = await events.append("product-OK", [registry.to_new_event(ok, event_id=uuid.uuid4())], ANY)
        started = time.monotonic()
        doc = await queries.get_product("OK", as_type=Document, min_position=written.position)
        assert doc["position"] >= written.position
        assert time.monotonic() - started < 2.0  # well inside the consistency timeout
        # The projection as a whole has not applied everything up to that position
        # (the parked event is below it): lists and searches say so at once.
        assert not await runner.wait_for_position(written.position, 0.5, stop_at_parked=False)
        with pytest.raises(ParkedEventBlocks):
            await queries.list_products(as_type=Document, min_position=written.position)
    finally:
        stop.set()
        await task
        await reads.close()
        await events.close()
