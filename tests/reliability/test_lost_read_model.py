"""Issue 12 item 5: a lost read model is noticed and filled again by itself.

The checkpoint lives with the read model (a table in ``read.db``; a document in the
Elasticsearch meta index), so deleting ``read.db`` (or the projection's index) loses it
too: the runner, restarted, sees a group that made progress over a read model that has
no checkpoint of it, starts the group again from the beginning, and ``/ready`` says
``rebuilding`` with its progress until the documents are back. (Before: an empty read
model, known documents 404, ``/ready`` ready with lag 0, for ever.)
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orderstream.application.projection_runner import ProjectionRunner
from orderstream.domain import inventory
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.base import ANY
from orderstream.eventstore.sqlite import SqliteEventStore
from orderstream.readstore.elasticsearch import ElasticsearchReadStore
from orderstream.readstore.sqlite import SqliteReadStore
from projections import product_stock
from tests.api.helpers import register_product
from tests.conftest import MakeClient
from tests.contract.conftest import drop_es_prefix

WAIT = 30.0
NOW = datetime(2024, 5, 1, tzinfo=UTC)
PRODUCTS = 40


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while True:
        if await check():
            return
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def register(events: SqliteEventStore, count: int) -> int:
    position = -1
    for i in range(count):
        sku = f"SKU-{i:03d}"
        new = registry.to_new_event(
            inventory.ProductRegistered(sku=sku, name=f"P {sku}", price=Money(100, "EUR"), at=NOW),
            event_id=uuid.uuid4(),
        )
        position = (await events.append(inventory.stream_name(sku), [new], ANY)).position
    return position


async def project_until(runner: ProjectionRunner, position: int) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        assert await runner.wait_for_position(position, WAIT)
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


async def test_a_deleted_read_db_is_filled_again_and_ready_says_rebuilding(
    make_client: MakeClient, tmp_path: Path
) -> None:
    data_dir = tmp_path / "lost"
    async with make_client(data_dir=data_dir) as (http, container):
        for i in range(5):
            written = await register_product(http, f"SKU-{i}", stock=1)
        assert (
            await http.get("/products/SKU-0", params={"min_position": written["position"]})
        ).status_code == 200
        before = (await http.get("/ready")).json()["projections"]["products"]
        assert before["state"] == "current"

    (data_dir / "read.db").unlink()
    for suffix in ("-wal", "-shm"):
        (data_dir / f"read.db{suffix}").unlink(missing_ok=True)

    async with make_client(data_dir=data_dir, projections=False) as (http, container):
        # Not running yet: the new, empty read model is noticed by the runner's start.
        runner = container.runners["products"]
        assert await runner.progress.applied_mark() is not None  # the group made progress
        assert await runner._prepare()  # what run() does first
        ready = (await http.get("/ready")).json()
        assert ready["status"] == "rebuilding"
        products = ready["projections"]["products"]
        assert products["state"] == "rebuilding"
        assert products["rebuild_progress"] == 0.0
        assert products["refill_until"] == written["position"]

    async with make_client(data_dir=data_dir) as (http, container):
        listed = await http.get("/products", params={"min_position": written["position"]})
        assert listed.status_code == 200, listed.text
        assert {p["sku"] for p in listed.json()["items"]} == {f"SKU-{i}" for i in range(5)}
        runner = container.runners["products"]

        async def filled() -> bool:
            return (await runner.status()).rebuilding is False

        await eventually(filled, "the lost read model filled again")
        assert (await http.get("/ready")).json()["status"] == "ready"


async def test_a_deleted_sqlite_read_model_restarts_its_projection_from_the_beginning(tmp_path: Path) -> None:
    events = await SqliteEventStore.open(tmp_path / "events.db", poll_interval=0.05)
    try:
        head = await register(events, PRODUCTS)
        reads = await SqliteReadStore.open(tmp_path / "read.db")
        runner = ProjectionRunner(events, reads, product_stock.projection)
        await project_until(runner, head)
        await reads.close()
        for name in ("read.db", "read.db-wal", "read.db-shm"):
            (tmp_path / name).unlink(missing_ok=True)

        reads = await SqliteReadStore.open(tmp_path / "read.db")
        try:
            runner = ProjectionRunner(events, reads, product_stock.projection)
            await project_until(runner, head)
            for i in range(PRODUCTS):
                assert await reads.get("products", f"SKU-{i:03d}") is not None, i
            assert (await runner.status()).rebuilding is False
        finally:
            await reads.close()
    finally:
        await events.close()


@pytest.fixture
async def es_url() -> AsyncIterator[tuple[str, str]]:
    url = os.environ.get("ORDERSTREAM_TEST_ES_URL")
    if not url:
        pytest.skip("set ORDERSTREAM_TEST_ES_URL to run the Elasticsearch part")
    prefix = f"lost-{uuid.uuid4().hex[:10]}-"
    yield url, prefix
    await drop_es_prefix(url, prefix)


@pytest.mark.elasticsearch
async def test_a_deleted_elasticsearch_index_restarts_its_projection_from_the_beginning(
    tmp_path: Path, es_url: tuple[str, str]
) -> None:
    url, prefix = es_url
    events = await SqliteEventStore.open(tmp_path / "events.db", poll_interval=0.05)
    try:
        head = await register(events, PRODUCTS)
        reads = await ElasticsearchReadStore.open(url, prefix=prefix)
        try:
            await project_until(ProjectionRunner(events, reads, product_stock.projection), head)
            physical = await reads.alias_target("products")
            assert physical is not None
            assert await reads.read_checkpoint(physical) is not None
            await reads._es.indices.delete(index=physical)  # the index is lost (its alias with it)
        finally:
            await reads.close()

        reads = await ElasticsearchReadStore.open(url, prefix=prefix)
        try:
            runner = ProjectionRunner(events, reads, product_stock.projection)
            await project_until(runner, head)
            await reads.refresh("products")
            for i in range(PRODUCTS):
                assert await reads.get("products", f"SKU-{i:03d}") is not None, i
        finally:
            await reads.close()
    finally:
        await events.close()


@pytest.mark.elasticsearch
async def test_an_elasticsearch_index_deleted_while_projecting_is_filled_again(
    tmp_path: Path, es_url: tuple[str, str]
) -> None:
    """Deleted under a running projector (hostile run): the runner made an empty index
    in its place, wrote on, and kept a checkpoint for it, so the loss was never noticed,
    not even after a restart: every earlier order answered 404 and /ready said ready."""
    url, prefix = es_url
    events = await SqliteEventStore.open(tmp_path / "events.db", poll_interval=0.05)
    reads = await ElasticsearchReadStore.open(url, prefix=prefix)
    runner = ProjectionRunner(events, reads, product_stock.projection)
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        head = await register(events, PRODUCTS)
        assert await runner.wait_for_position(head, WAIT)
        physical = await reads.alias_target("products")
        assert physical is not None
        await reads._es.indices.delete(index=physical)  # the index is lost (its alias with it)
        later = await register_more(events)

        async def all_there() -> bool:
            if not await runner.wait_for_position(later, 0.5):
                return False
            await reads.refresh("products")
            found = await reads.get_many("products", [f"SKU-{i:03d}" for i in range(PRODUCTS)])
            return len(found) == PRODUCTS and await reads.get("products", "LATE-1") is not None

        await eventually(all_there, "every product in the read model again")
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)
        await reads.close()
        await events.close()


async def register_more(events: SqliteEventStore) -> int:
    new = registry.to_new_event(
        inventory.ProductRegistered(sku="LATE-1", name="Late", price=Money(100, "EUR"), at=NOW),
        event_id=uuid.uuid4(),
    )
    return (await events.append(inventory.stream_name("LATE-1"), [new], ANY)).position
