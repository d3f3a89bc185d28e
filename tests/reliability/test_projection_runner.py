"""The projection runner against the real embedded stores (SQLite event store + SQLite read store).

Redelivery, restarts, competing consumers, poison events and rebuilds must never
apply an event twice or lose one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from orderstream.application.projection_runner import ParkedEventBlocks, ProjectionRunner
from orderstream.domain import inventory
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.base import ANY, NewEvent, SubscriptionGroupNotFound
from orderstream.eventstore.sqlite import SqliteEventStore
from orderstream.readstore.base import (
    CollectionSchema,
    Document,
    Query,
    ReadStoreUnavailable,
    Stored,
    WriteOp,
    WriteOutcome,
)
from orderstream.readstore.sqlite import SqliteReadStore
from projections import product_stock
from projections.base import ProjectedEvent, Projection

WAIT = 15.0
PRODUCTS = "products"


class Stores(msgspec.Struct):
    events: SqliteEventStore
    reads: SqliteReadStore


@pytest.fixture
async def stores(tmp_path: Path) -> AsyncIterator[Stores]:
    events = await SqliteEventStore.open(tmp_path / "events.db", poll_interval=0.05)
    reads = await SqliteReadStore.open(tmp_path / "read.db")
    try:
        yield Stores(events, reads)
    finally:
        await reads.close()
        await events.close()


class Versioned:
    """The product projection under another schema version (a bump means a rebuild)."""

    def __init__(self, inner: Projection, version: int) -> None:
        self.inner = inner
        self.schema: CollectionSchema = msgspec.structs.replace(inner.schema, version=version)
        self.handles = inner.handles
        self.categories = inner.categories
        self.contiguous = inner.contiguous

    def document_id(self, event: ProjectedEvent) -> str:
        return self.inner.document_id(event)

    def fold(self, document: Document | None, event: ProjectedEvent) -> Document | None:
        return self.inner.fold(document, event)


# ----------------------------------------------------------------------------- helpers


NOW = datetime(2024, 5, 1, tzinfo=UTC)


async def append(store: SqliteEventStore, *events: inventory.InventoryEvent) -> int:
    position = -1
    for event in events:
        new = registry.to_new_event(event, event_id=uuid.uuid4())
        result = await store.append(inventory.stream_name(event.sku), [new], ANY)
        position = result.position
    return position


async def register(store: SqliteEventStore, sku: str) -> int:
    return await append(
        store, inventory.ProductRegistered(sku=sku, name=f"Product {sku}", price=Money(100, "EUR"), at=NOW)
    )


async def add_stock(store: SqliteEventStore, sku: str, quantity: int) -> int:
    return await append(store, inventory.StockAdded(sku=sku, quantity=quantity, at=NOW))


async def head(store: SqliteEventStore) -> int:
    position = await store.head_position()
    assert position is not None
    return position


class Counter:
    def __init__(self) -> None:
        self.applied = 0

    def __call__(self, name: str, count: int) -> None:
        assert name == PRODUCTS
        self.applied += count


@contextlib.asynccontextmanager
async def running(runner: ProjectionRunner) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(runner.run(stop))
    try:
        yield task
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


PRODUCTS_V1 = Versioned(product_stock.projection, 1)
"""The product projection pinned at version 1: these tests bump versions from there."""


def runner_for(stores: Stores, projection: Projection = PRODUCTS_V1, **options: object) -> ProjectionRunner:
    return ProjectionRunner(stores.events, stores.reads, projection, **options)  # type: ignore[arg-type]


async def product(stores: Stores, sku: str) -> Document:
    doc = await stores.reads.get(PRODUCTS, sku)
    assert doc is not None, sku
    return doc


@contextlib.contextmanager
def within(seconds: float) -> Iterator[None]:
    started = time.monotonic()
    yield
    assert time.monotonic() - started < seconds


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = WAIT) -> None:
    async with asyncio.timeout(seconds):
        while True:
            if await check():
                return
            await asyncio.sleep(0.02)


async def parked_count(stores: Stores, group: str, count: int) -> bool:
    try:
        return len(await stores.events.list_parked(group)) == count
    except SubscriptionGroupNotFound:  # the runner has not created it yet
        return False


# ------------------------------------------------------------------------------- tests


async def test_appended_events_become_documents(stores: Stores) -> None:
    runner = runner_for(stores)
    async with running(runner):
        await register(stores.events, "A")
        await add_stock(stores.events, "A", 7)
        await register(stores.events, "B")
        assert await runner.wait_for_position(await head(stores.events), WAIT)
        a = await product(stores, "A")
        assert (a["on_hand"], a["available"], a["revision"]) == (7, 7, 1)
        assert (await product(stores, "B"))["on_hand"] == 0
        page = await stores.reads.query(PRODUCTS, Query(text="product"))
        assert [d["sku"] for d in page.items] == ["A", "B"]
        status = await runner.status()
        assert status.checkpoint is not None
        assert status.checkpoint >= await head(stores.events)
        assert (status.lag_events, status.lag_seconds, status.parked) == (0, 0.0, 0)
        assert status.physical == "products_v1"
        assert status.group == "projection-products-v1"


async def test_wait_for_position_is_false_within_the_timeout_when_nothing_runs(stores: Stores) -> None:
    await register(stores.events, "A")
    position = await add_stock(stores.events, "A", 1)
    runner = runner_for(stores)
    with within(2.0):
        assert not await runner.wait_for_position(position, 0.3)
    status = await runner.status()
    assert status.lag_events == 2
    assert not status.group_exists
    async with running(runner):
        assert await runner.wait_for_position(position, WAIT)
    # Positions of events the projection does not handle never hold it back.
    assert await runner.wait_for_position(position, 0.0)


async def test_status_reports_lag_while_stopped(stores: Stores) -> None:
    runner = runner_for(stores)
    async with running(runner):
        assert await runner.wait_for_position(await register(stores.events, "A"), WAIT)
    await add_stock(stores.events, "A", 1)
    await add_stock(stores.events, "A", 1)
    await asyncio.sleep(0.05)
    status = await runner.status()
    assert status.lag_events == 2
    assert status.lag_seconds > 0
    assert status.checkpoint is not None
    assert status.checkpoint < await head(stores.events)


async def test_a_restarted_runner_applies_nothing_twice(stores: Stores) -> None:
    counter = Counter()
    await register(stores.events, "A")
    for _ in range(10):
        await add_stock(stores.events, "A", 1)
    async with running(first := runner_for(stores, on_applied=counter)):
        assert await first.wait_for_position(await head(stores.events), WAIT)
    for _ in range(5):
        await add_stock(stores.events, "A", 1)
    async with running(second := runner_for(stores, on_applied=counter)):
        assert await second.wait_for_position(await head(stores.events), WAIT)
    doc = await product(stores, "A")
    assert (doc["on_hand"], doc["revision"]) == (15, 15)
    assert counter.applied == 16

    # Even a full redelivery (the group recreated from the start) changes nothing.
    await stores.events.delete_subscription_group(second.group)
    async with running(third := runner_for(stores, on_applied=counter)):
        assert await third.wait_for_position(await head(stores.events), WAIT)
    doc = await product(stores, "A")
    assert (doc["on_hand"], doc["revision"]) == (15, 15)
    assert counter.applied == 16


async def test_two_runners_on_one_group_apply_each_event_once(stores: Stores) -> None:
    counter = Counter()
    one, two = runner_for(stores, on_applied=counter), runner_for(stores, on_applied=counter)
    skus = [f"S{n}" for n in range(8)]
    async with running(one), running(two):
        for sku in skus:
            await register(stores.events, sku)

        async def writer(sku: str) -> None:
            for quantity in range(1, 21):
                await add_stock(stores.events, sku, quantity)

        await asyncio.gather(*(writer(sku) for sku in skus))
        position = await head(stores.events)
        assert await one.wait_for_position(position, WAIT)
        assert await two.wait_for_position(position, WAIT)
    for sku in skus:
        doc = await product(stores, sku)
        assert (doc["on_hand"], doc["revision"]) == (sum(range(1, 21)), 20)
    assert counter.applied == len(skus) * 21


async def test_a_poison_event_is_parked_and_the_rest_goes_on(stores: Stores) -> None:
    runner = runner_for(stores, max_retry=2)
    async with running(runner):
        await register(stores.events, "A")
        # Data the projection cannot fold (no quantity), as a buggy or hand-written event might be.
        bad = NewEvent(
            id=uuid.uuid4(),
            type="StockAdded",
            data=json.dumps({"sku": "A", "at": "2024-05-01T00:00:00Z"}).encode(),
        )
        await stores.events.append(inventory.stream_name("A"), [bad], ANY)
        await add_stock(stores.events, "A", 4)
        await register(stores.events, "B")
        last = await add_stock(stores.events, "B", 5)

        async def settled() -> bool:
            status = await runner.status()
            return status.parked == 1 and status.checkpoint is not None and status.checkpoint >= last

        await eventually(settled)
        # A parked event is not applied: the projection has not reached it (nor anything
        # after), and a wait for a position past it says so at once instead of timing out.
        parked_at = (await stores.events.list_parked(runner.group))[0].event.position
        with within(1.0), pytest.raises(ParkedEventBlocks) as blocked:
            await runner.wait_for_position(last, WAIT)
        assert blocked.value.parked.event.position == parked_at
        assert blocked.value.group == runner.group
        assert "product-A@1" in str(blocked.value)
        assert await runner.wait_for_position(parked_at - 1, 0.0)
        assert await runner.reached_position() == parked_at - 1

        assert (await product(stores, "B"))["on_hand"] == 5
        assert (await product(stores, "A"))["on_hand"] == 4  # later events of its stream still apply
        parked = await stores.events.list_parked(runner.group)
        assert [p.event.revision for p in parked] == [1]
        assert parked[0].attempts == 2
        assert "quantity" in parked[0].reason
        assert (await runner.status()).parked == 1


class FailsAtFirst(Versioned):
    """The product projection, but folding revision ``revision`` of a stream fails the
    first ``times`` times (a bug fixed by a redeploy, a dependency back up)."""

    def __init__(self, revision: int, times: int) -> None:
        super().__init__(product_stock.projection, product_stock.SCHEMA.version)
        self.revision = revision
        self.left = times

    def fold(self, document: Document | None, event: ProjectedEvent) -> Document | None:
        if event.revision == self.revision and self.left > 0:
            self.left -= 1
            raise ValueError("not yet")
        return super().fold(document, event)


async def test_a_failed_event_of_a_run_is_retried_before_the_rest_of_its_stream(stores: Stores) -> None:
    await register(stores.events, "A")
    for quantity in (1, 2, 4, 8, 16, 32):  # a hot stream: one run, revisions 1..6
        await add_stock(stores.events, "A", quantity)
    projection = FailsAtFirst(revision=3, times=2)
    runner = runner_for(stores, projection, max_retry=5)
    async with running(runner):
        assert await runner.wait_for_position(await head(stores.events), WAIT)
    assert projection.left == 0
    doc = await product(stores, "A")
    assert (doc["on_hand"], doc["revision"]) == (63, 6)  # revision 3 applied, not skipped over
    assert await stores.events.list_parked(runner.group) == []


async def test_a_bumped_version_rebuilds_while_the_old_runner_serves(stores: Stores) -> None:
    old = runner_for(stores)
    skus = [f"R{n}" for n in range(5)]
    for sku in skus:
        await register(stores.events, sku)
    async with running(old) as old_task:
        for n in range(100):
            await add_stock(stores.events, skus[n % 5], 1)
        assert await old.wait_for_position(await head(stores.events), WAIT)

        keep_writing = asyncio.Event()

        async def writer() -> int:
            written = 0
            while not keep_writing.is_set():
                await add_stock(stores.events, skus[written % 5], 1)
                written += 1
                await asyncio.sleep(0.002)
            return written

        writing = asyncio.create_task(writer())
        await asyncio.sleep(0.05)
        calls: list[tuple[int, int]] = []
        new = runner_for(stores, Versioned(product_stock.projection, 2))
        result = await new.rebuild(lambda done, total: calls.append((done, total)), page_size=20)
        assert result.physical == "products_v2"
        assert result.previous == "products_v1"
        assert await stores.reads.alias_target(PRODUCTS) == "products_v2"
        assert calls, "progress is reported"
        assert all(done <= total for done, total in calls)
        assert calls[-1][0] == calls[-1][1] == result.position

        # The old runner sees a newer version behind the alias and stops by itself.
        await asyncio.wait_for(old_task, WAIT)
        async with running(new):
            keep_writing.set()
            written = await writing
            assert await new.wait_for_position(await head(stores.events), WAIT)
        total = 0
        for sku in skus:
            doc = await product(stores, sku)
            total += doc["on_hand"]
            assert doc["revision"] == await stores.events.stream_revision(inventory.stream_name(sku))
        assert total == 100 + written
    assert await stores.reads.get_version(PRODUCTS, "R0", physical="products_v1") is None


async def test_a_same_version_rebuild_is_followed_by_the_live_runner(stores: Stores) -> None:
    runner = runner_for(stores)
    await register(stores.events, "A")
    async with running(runner):
        for _ in range(30):
            await add_stock(stores.events, "A", 1)
        # The live runner is at the version the rebuild finds (else it builds the unsuffixed table).
        assert await runner.wait_for_position(await head(stores.events), WAIT)
        result = await runner_for(stores).rebuild()
        assert result.physical.startswith("products_v1_r")
        assert await stores.reads.alias_target(PRODUCTS) == result.physical
        for _ in range(10):
            await add_stock(stores.events, "A", 1)
        assert await runner.wait_for_position(await head(stores.events), WAIT)
        doc = await product(stores, "A")
        assert (doc["on_hand"], doc["revision"]) == (40, 40)
        assert (await runner.status()).physical == result.physical


class FailingWrites:
    """The real read store, whose writes fail from the second on (the node went down
    in the middle of a rebuild); records the physical table the rebuild made."""

    def __init__(self, inner: SqliteReadStore) -> None:
        self.inner = inner
        self.made: list[str] = []
        self.writes = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def ensure_collection(self, schema: CollectionSchema, *, suffix: str | None = None) -> str:
        physical = await self.inner.ensure_collection(schema, suffix=suffix)
        self.made.append(physical)
        return physical

    async def write(
        self, collection: str, ops: Sequence[WriteOp], *, physical: str | None = None
    ) -> list[WriteOutcome]:
        self.writes += 1
        if self.writes > 1:
            raise ReadStoreUnavailable("the read store (test)", ConnectionError("down"))
        return await self.inner.write(collection, ops, physical=physical)


async def test_a_rebuild_that_fails_halfway_leaves_no_half_filled_table(stores: Stores) -> None:
    """It left its index behind (hostile run: 8,258 partial documents in an orphan
    index after Elasticsearch stopped mid-rebuild); the alias stays where it was."""
    runner = runner_for(stores)
    for sku in ("A", "B", "C"):
        await register(stores.events, sku)
    async with running(runner):
        assert await runner.wait_for_position(await head(stores.events), WAIT)
    live = await stores.reads.alias_target(PRODUCTS)
    failing = FailingWrites(stores.reads)
    rebuilder = ProjectionRunner(stores.events, failing, PRODUCTS_V1)  # type: ignore[arg-type]
    with pytest.raises(ReadStoreUnavailable):
        await rebuilder.rebuild(page_size=1)
    (made,) = failing.made
    assert made != live
    assert await stores.reads.alias_target(PRODUCTS) == live
    assert stores.reads._table(made) is None  # dropped
    assert (await product(stores, "A"))["sku"] == "A"  # the live table serves on


class SlowSwitch:
    """The real read store, but the alias switch takes a while (an Elasticsearch alias
    update under load) and, once switched, reads are slow (the catch-up replay has a
    backlog): the live runner gets to the new table before the rebuild's catch-up."""

    def __init__(self, inner: SqliteReadStore) -> None:
        self.inner = inner
        self.switched = False

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def switch_alias(self, collection: str, physical: str) -> str | None:
        await asyncio.sleep(0.5)
        old = await self.inner.switch_alias(collection, physical)
        self.switched = True
        return old

    async def get_many(
        self, collection: str, doc_ids: Sequence[str], *, physical: str | None = None
    ) -> dict[str, Stored]:
        if self.switched:
            await asyncio.sleep(0.3)
        return await self.inner.get_many(collection, doc_ids, physical=physical)


async def test_a_same_version_rebuild_beside_a_live_runner_and_writers_loses_nothing(stores: Stores) -> None:
    live = runner_for(stores)
    await register(stores.events, "A")
    async with running(live):
        for _ in range(30):
            await add_stock(stores.events, "A", 1)
        assert await live.wait_for_position(await head(stores.events), WAIT)

        async def writer() -> int:
            written = 0
            loop = asyncio.get_running_loop()
            end = loop.time() + 2.0
            while loop.time() < end:
                await add_stock(stores.events, "A", 1)
                written += 1
                await asyncio.sleep(0.02)
            return written

        writing = asyncio.create_task(writer())
        rebuilder = ProjectionRunner(stores.events, SlowSwitch(stores.reads), PRODUCTS_V1)  # type: ignore[arg-type]
        result = await rebuilder.rebuild()
        written = await writing
        assert await live.wait_for_position(await head(stores.events), WAIT)
        assert await stores.reads.alias_target(PRODUCTS) == result.physical
        doc = await product(stores, "A")
        assert (doc["revision"], doc["on_hand"]) == (30 + written, 30 + written)


async def test_starting_a_bumped_runner_rebuilds_first(stores: Stores) -> None:
    v1 = runner_for(stores)
    await register(stores.events, "A")
    await add_stock(stores.events, "A", 3)
    async with running(v1):
        assert await v1.wait_for_position(await head(stores.events), WAIT)
    v2 = runner_for(stores, Versioned(product_stock.projection, 2))
    async with running(v2):
        await add_stock(stores.events, "A", 2)
        assert await v2.wait_for_position(await head(stores.events), WAIT)
        assert await stores.reads.alias_target(PRODUCTS) == "products_v2"
        doc = await product(stores, "A")
        assert (doc["on_hand"], doc["revision"]) == (5, 2)
    # The old version, started again (an old deployment), refuses to take over.
    stop = asyncio.Event()
    await asyncio.wait_for(v1.run(stop), WAIT)
    assert await stores.reads.alias_target(PRODUCTS) == "products_v2"


class FlakyReadStore:
    """A read store whose writes fail for a while (an outage) or always for some documents."""

    def __init__(
        self, inner: SqliteReadStore, *, outage_writes: int = 0, refuse: frozenset[str] = frozenset()
    ) -> None:
        self.inner = inner
        self.outage_writes = outage_writes
        self.refuse = refuse

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def write(
        self, collection: str, ops: Sequence[WriteOp], *, physical: str | None = None
    ) -> list[WriteOutcome]:
        if self.outage_writes > 0:
            self.outage_writes -= 1
            raise OSError("read store unreachable")
        if any(op.id in self.refuse for op in ops):
            raise ValueError("document refused")
        return await self.inner.write(collection, ops, physical=physical)


async def test_a_read_store_outage_delays_but_parks_nothing(stores: Stores) -> None:
    flaky = FlakyReadStore(stores.reads, outage_writes=4)
    runner = ProjectionRunner(stores.events, flaky, product_stock.projection, max_retry=2)  # type: ignore[arg-type]
    await register(stores.events, "A")
    await add_stock(stores.events, "A", 2)
    async with running(runner):
        assert await runner.wait_for_position(await head(stores.events), WAIT)
    assert flaky.outage_writes == 0
    assert (await product(stores, "A"))["on_hand"] == 2
    assert await stores.events.list_parked(runner.group) == []


async def test_a_document_the_store_refuses_is_parked_alone(stores: Stores) -> None:
    flaky = FlakyReadStore(stores.reads, refuse=frozenset({"BAD"}))
    runner = ProjectionRunner(  # type: ignore[arg-type]
        stores.events, flaky, product_stock.projection, max_retry=2, write_attempts=1, linger_seconds=0.05
    )
    for sku in ("A", "BAD", "C"):
        await register(stores.events, sku)
    async with running(runner):
        await eventually(lambda: parked_count(stores, runner.group, 1))
        with pytest.raises(ParkedEventBlocks):  # BAD is not applied
            await runner.wait_for_position(await head(stores.events), 0.1)
    assert await stores.reads.get(PRODUCTS, "A") is not None
    assert await stores.reads.get(PRODUCTS, "C") is not None
    assert await stores.reads.get(PRODUCTS, "BAD") is None
    parked = await stores.events.list_parked(runner.group)
    assert [p.event.stream for p in parked] == ["product-BAD"]


class TimedOutage:
    """A read store whose writes fail until a moment (an outage of a few seconds)."""

    def __init__(self, inner: SqliteReadStore, seconds: float) -> None:
        self.inner = inner
        self.until = time.monotonic() + seconds

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def write(
        self, collection: str, ops: Sequence[WriteOp], *, physical: str | None = None
    ) -> list[WriteOutcome]:
        if time.monotonic() < self.until:
            raise OSError("read store unreachable")
        return await self.inner.write(collection, ops, physical=physical)


async def test_an_outage_of_several_ack_timeouts_parks_nothing_and_is_not_reported_applied(
    stores: Stores,
) -> None:
    await register(stores.events, "A")
    await add_stock(stores.events, "A", 2)
    await register(stores.events, "B")
    outage = TimedOutage(stores.reads, 4.0)
    runner = ProjectionRunner(  # type: ignore[arg-type]
        stores.events, outage, product_stock.projection, max_retry=2, ack_timeout_seconds=0.5
    )
    async with running(runner):
        position = await head(stores.events)
        assert not await runner.wait_for_position(position, 3.0)  # six ack timeouts into the outage
        assert await stores.events.list_parked(runner.group) == []
        assert await runner.wait_for_position(position, WAIT)
        assert time.monotonic() >= outage.until
    assert await stores.events.list_parked(runner.group) == []
    assert (await product(stores, "A"))["on_hand"] == 2
    assert (await product(stores, "B"))["on_hand"] == 0
    assert (await runner.status()).parked == 0
