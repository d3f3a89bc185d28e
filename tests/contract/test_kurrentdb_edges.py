"""Adapter paths the contract suite does not reach, against a KurrentDB server (a real
one when ``ORDERSTREAM_TEST_KURRENTDB_URL`` is given or Docker answers, else the
protocol stand-in: then marked ``kurrentdb_standin``). Each test names the branch of
the adapter it is there for; docs/kurrentdb.md lists the branches left uncovered.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from kurrentdbclient import AsyncKurrentDBClient
from kurrentdbclient import NewEvent as KdbNewEvent
from kurrentdbclient import StreamState as KdbStreamState

from orderstream.application.commands import CommandContext
from orderstream.bootstrap import build
from orderstream.config import Settings
from orderstream.domain import inventory
from orderstream.domain.common import Money
from orderstream.eventstore.base import (
    ANY,
    NO_STREAM,
    EventFilter,
    EventStoreUnavailable,
    NackAction,
    NewEvent,
    SubscriptionSettings,
)
from orderstream.eventstore.kurrentdb import KurrentDBEventStore, idempotency_stream
from orderstream.eventstore.kurrentdb_mapping import (
    category_pattern,
    decode_metadata,
    encode_metadata,
    parse_parked_link_metadata,
    settings_stream,
)

WAIT = 10.0


def new(type_: str = "Happened") -> NewEvent:
    return NewEvent(id=uuid.uuid4(), type=type_, data=b"{}")


@pytest.fixture
async def store(kurrentdb_url: str) -> AsyncIterator[KurrentDBEventStore]:
    opened = await KurrentDBEventStore.open(kurrentdb_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def client(kurrentdb_url: str) -> AsyncIterator[AsyncKurrentDBClient]:
    raw = AsyncKurrentDBClient(kurrentdb_url)
    await raw.connect()
    try:
        yield raw
    finally:
        await raw.close()


async def test_a_limit_of_zero_reads_nothing(store: KurrentDBEventStore, unique: str) -> None:
    await store.append(f"order-{unique}", [new()], NO_STREAM)
    assert await store.read_stream(f"order-{unique}", limit=0) == []
    assert await store.read_all(limit=0) == []


async def test_subscribe_checks_the_types_the_server_did_not_filter(
    store: KurrentDBEventStore, unique: str
) -> None:
    """Categories and types: the server filters by category, the adapter drops the other
    types (``subscribe``'s ``wanted`` check)."""
    category = f"c{unique}"
    after = await store.head_position()
    wanted, other = new("Wanted"), new("Other")
    await store.append(f"{category}-1", [other, wanted], NO_STREAM)

    subscription = store.subscribe(after=after, filter=EventFilter(categories=(category,), types=("Wanted",)))
    try:
        async with asyncio.timeout(WAIT):
            first = await anext(subscription)
    finally:
        await subscription.aclose()
    assert first.id == wanted.id


async def test_the_backwards_scan_pages_through_long_streams(store: KurrentDBEventStore, unique: str) -> None:
    """``_stream_backwards`` reads 100 at a time (used to locate appended events and to
    read park notes)."""
    stream = f"order-{unique}"
    await store.append(stream, [new() for _ in range(250)], NO_STREAM)
    revisions = [raw.stream_position async for raw in store._stream_backwards(stream, max_events=1_000)]
    assert revisions == list(range(249, -1, -1))
    limited = [raw.stream_position async for raw in store._stream_backwards(stream, max_events=120)]
    assert limited == list(range(249, 129, -1))


async def test_an_event_appended_with_any_is_located_behind_later_ones(
    store: KurrentDBEventStore, unique: str
) -> None:
    """An ANY append whose events are already stored (an idempotent re-append) is found
    by id, newest first, even when others were appended after it."""
    stream = f"order-{unique}"
    batch = [new(), new()]
    first = await store.append(stream, batch, ANY)
    await store.append(stream, [new() for _ in range(3)], ANY)
    assert await store.append(stream, batch, ANY) == first


async def test_a_group_created_by_other_tools_works_with_the_server_filter_only(
    store: KurrentDBEventStore, client: AsyncKurrentDBClient, unique: str
) -> None:
    """No ``$orderstream-subscription-settings-`` record: ``_record`` finds nothing and the
    consumer starts from the server's ``start_from``."""
    category = f"c{unique}"
    group = f"foreign-{unique}"
    await client.create_subscription_to_all(
        group,
        filter_include=(category_pattern((category,)),),
        filter_by_stream_name=True,
        consumer_strategy="Pinned",
    )
    await store.append(f"{category}-1", [new("A"), new("B")], NO_STREAM)
    subscription = await store.connect_subscription_group(group)
    try:
        async with asyncio.timeout(WAIT):
            got = [await anext(aiter(subscription)), await anext(aiter(subscription))]
            for event in got:
                await subscription.ack(event)
        assert [e.type for e in got] == ["A", "B"]
        info = await store.subscription_group_info(group)
        assert info.parked == 0
    finally:
        await subscription.close()
        await store.delete_subscription_group(group)


async def test_an_unreadable_group_record_falls_back_to_the_server_filter(
    store: KurrentDBEventStore, client: AsyncKurrentDBClient, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    category = f"c{unique}"
    group = f"group-{unique}"
    await store.create_subscription_group(
        group,
        SubscriptionSettings(
            filter=EventFilter(categories=(category,), types=("Kept",)),
            from_position=await store.head_position(),
        ),
    )
    await client.append_to_stream(
        settings_stream(group),
        events=[KdbNewEvent(type="SubscriptionGroup", data=b"not json")],
        current_version=KdbStreamState.ANY,
    )
    with caplog.at_level(logging.WARNING):
        info = await store.subscription_group_info(group)
    assert info.in_flight == 0
    assert "unreadable record of subscription group" in caplog.text
    await store.delete_subscription_group(group)


async def test_parked_events_whose_stream_was_deleted_are_not_listed(
    store: KurrentDBEventStore, client: AsyncKurrentDBClient, unique: str
) -> None:
    """A parked link that no longer resolves (its event's stream deleted) is skipped."""
    category = f"c{unique}"
    group = f"group-{unique}"
    await store.create_subscription_group(
        group,
        SubscriptionSettings(
            filter=EventFilter(categories=(category,)), from_position=await store.head_position()
        ),
    )
    assert await store.replay_parked(group) == 0  # nothing parked yet: no parked stream
    await store.append(f"{category}-1", [new()], NO_STREAM)
    await store.append(f"{category}-2", [new()], NO_STREAM)
    subscription = await store.connect_subscription_group(group)
    try:
        async with asyncio.timeout(WAIT):
            for _ in range(2):
                event = await anext(aiter(subscription))
                await subscription.nack(event, NackAction.PARK, "x")
            for _ in range(200):  # parking is asynchronous on a real server
                if len(await store.list_parked(group)) == 2:
                    break
                await asyncio.sleep(0.05)
    finally:
        await subscription.close()
    await client.delete_stream(f"{category}-1", current_version=KdbStreamState.ANY)

    (left,) = await store.list_parked(group)
    assert left.event.stream == f"{category}-2"
    await store.delete_subscription_group(group)


async def test_a_consumer_of_a_deleted_group_sees_the_store_unavailable(
    store: KurrentDBEventStore, unique: str
) -> None:
    """The server ends the consumer's stream: ``_pump`` keeps the error and the next
    ``__anext__`` raises :class:`EventStoreUnavailable`, not a client exception."""
    category = f"c{unique}"
    group = f"group-{unique}"
    await store.create_subscription_group(
        group,
        SubscriptionSettings(
            filter=EventFilter(categories=(category,)), from_position=await store.head_position()
        ),
    )
    subscription = await store.connect_subscription_group(group)
    try:
        await store.delete_subscription_group(group)
        with pytest.raises(EventStoreUnavailable):
            async with asyncio.timeout(WAIT):
                await anext(aiter(subscription))
    finally:
        await subscription.close()


async def test_a_keyed_command_whose_record_was_lost_is_not_applied_twice(
    kurrentdb_url: str, client: AsyncKurrentDBClient, tmp_path: Path, unique: str
) -> None:
    """Events stored, idempotency record lost (a crash between the two appends): the
    retried command must answer from the stored events, not store them again
    (``_refuse_ids_stored_earlier`` and the handler's slow path)."""
    container = await build(Settings(data_dir=tmp_path, event_store_url=kurrentdb_url))
    try:
        sku = f"SKU-{unique}"
        context = CommandContext(actor="alice", idempotency_key=f"k-{unique}", request_hash="h")
        await container.use_cases.register_product(
            sku, "mug", Money(100, "EUR"), CommandContext(actor="alice")
        )
        first = await container.use_cases.add_stock(sku, 5, context)
        stream = inventory.stream_name(sku)
        await client.delete_stream(
            idempotency_stream("alice", f"k-{unique}", stream), current_version=KdbStreamState.ANY
        )

        again = await container.use_cases.add_stock(sku, 5, context)

        assert (again.revision, again.position) == (first.revision, first.position)
        stored = await container.event_store.read_stream(stream)
        assert [e.type for e in stored].count("StockAdded") == 1
    finally:
        await container.close()


# ---------------------------------------------------------- pure mapping edges (no server)


def test_a_negative_schema_version_is_refused() -> None:
    with pytest.raises(ValueError, match="schema_version"):
        encode_metadata(b"{}", -1)


@pytest.mark.parametrize(
    "stored",
    [
        b'{"$schema_version":2,"$metadata":"unterminated',  # not JSON
        b'{"$schema_version":2,"$metadata":7}',  # raw metadata that is not a string
    ],
)
def test_damaged_raw_metadata_reads_as_foreign(stored: bytes) -> None:
    assert decode_metadata(stored) == (1, stored)


def test_an_unparseable_parking_time_is_left_out() -> None:
    info = parse_parked_link_metadata(b'{"Added":"yesterday","Reason":"Reached retry count of 2"}')
    assert (info.added, info.attempts) == (None, 3)
