"""KurrentDB-specific tests, beside the shared contract suite (``test_event_store.py``).

Three kinds:

- pure translation (URI, expectations, filters, metadata, positions, parked links):
  no server, always run;
- the consumer's own bookkeeping (per-stream holds, hand-off of a hung consumer,
  park notes), driven by a scripted stand-in for the *client's* subscription stream.
  It checks orderstream's code around the client, not KurrentDB; the contract suite
  is what checks the real server;
- things only a real server can show (strategy and settings of a created group, how
  events look to other KurrentDB tools, the parked stream's name). These take the
  ``kurrentdb_url`` fixture and are skipped, with the conftest's message, when no
  server is reachable.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from kurrentdbclient import AsyncKurrentDBClient
from kurrentdbclient import RecordedEvent as KdbRecordedEvent
from kurrentdbclient import StreamState as KdbStreamState
from kurrentdbclient.common import construct_filter_exclude_regex, construct_filter_include_regex

from orderstream.eventstore.base import (
    ANY,
    NO_STREAM,
    STREAM_EXISTS,
    AppendResult,
    EventFilter,
    EventMetadata,
    EventStoreUnavailable,
    NackAction,
    NewEvent,
    RecordedEvent,
    SubscriptionSettings,
)
from orderstream.eventstore.kurrentdb import KurrentDBEventStore
from orderstream.eventstore.kurrentdb_consumer import KurrentDBPersistentSubscription, to_recorded
from orderstream.eventstore.kurrentdb_mapping import (
    CONSUMER_STRATEGY,
    UNKNOWN,
    ParkNote,
    actual_from_client,
    category_pattern,
    client_nack_action,
    decode_metadata,
    encode_metadata,
    expectation_met,
    parked_stream,
    parse_all_position,
    parse_parked_link_metadata,
    revision_after_append,
    server_filter,
    server_max_retry_count,
    to_client_expected,
    type_pattern,
    validate_uri,
    wanted,
)

# ============================================================================ URIs


@pytest.mark.parametrize(
    "uri",
    [
        "kurrentdb://localhost:2113?tls=false",
        "kurrentdb://localhost?tls=false",
        "esdb://127.0.0.1:2113?tls=false",
        "kurrentdb+discover://cluster.local:2113?tls=false",
        "esdb+discover://cluster.local:2113?tls=false&nodePreference=follower",
        "kurrentdb://admin:changeit@node1:2113,node2:2113,node3:2113",
    ],
)
def test_accepted_uris(uri: str) -> None:
    spec = validate_uri(uri)
    assert spec.targets


def test_a_uri_without_a_port_uses_2113() -> None:
    assert list(validate_uri("kurrentdb://db?tls=false").targets) == ["db:2113"]


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("http://localhost:2113", "not a KurrentDB connection string"),
        ("sqlite:///tmp/events.db", "not a KurrentDB connection string"),
        ("localhost:2113", "not a KurrentDB connection string"),
        ("kurrentdb://localhost:2113", "?tls=false"),  # TLS by default needs credentials
        ("kurrentdb://localhost:2113?tls=maybe", "invalid KurrentDB connection string"),
        ("kurrentdb://localhost:2113?tls=false&colour=blue", "Unknown field"),
        ("kurrentdb+discover://a:2113,b:2113?tls=false", "More than one target"),
    ],
)
def test_rejected_uris_say_why(uri: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_uri(uri)


async def test_open_rejects_a_bad_uri_before_connecting() -> None:
    with pytest.raises(ValueError, match="not a KurrentDB connection string"):
        await KurrentDBEventStore.open("postgres://localhost/events")


async def test_open_reports_an_unreachable_server_as_unavailable() -> None:
    # Port 1 on the loopback interface refuses connections: no server is involved.
    with pytest.raises(EventStoreUnavailable):
        await KurrentDBEventStore.open("kurrentdb://127.0.0.1:1?tls=false", connect_timeout=5)


# ============================================================== expectations


def test_expectations_map_to_the_clients_current_version() -> None:
    assert to_client_expected(NO_STREAM) is KdbStreamState.NO_STREAM
    assert to_client_expected(STREAM_EXISTS) is KdbStreamState.EXISTS
    assert to_client_expected(ANY) is KdbStreamState.ANY
    assert to_client_expected(0) == 0
    assert to_client_expected(41) == 41


@pytest.mark.parametrize("bad", [-1, -2, True, 1.0, "3", None])
def test_invalid_expectations_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="expected revision"):
        to_client_expected(bad)  # type: ignore[arg-type]


def test_the_actual_revision_comes_from_the_clients_exception() -> None:
    assert actual_from_client(7) == 7
    assert actual_from_client(0) == 0
    assert actual_from_client(KdbStreamState.NO_STREAM) is None
    # Anything else is "not known": the adapter then reads the stream's last revision.
    for unknown in (None, KdbStreamState.ANY, KdbStreamState.EXISTS, -3, True):
        assert actual_from_client(unknown) is UNKNOWN


def test_revision_after_an_append_when_it_follows_from_the_expectation() -> None:
    assert revision_after_append(NO_STREAM, 3) == 2
    assert revision_after_append(4, 2) == 6
    assert revision_after_append(ANY, 2) is None
    assert revision_after_append(STREAM_EXISTS, 2) is None


@pytest.mark.parametrize(
    ("expected", "revision", "met"),
    [
        (ANY, None, True),
        (ANY, 3, True),
        (NO_STREAM, None, True),
        (NO_STREAM, 0, False),
        (STREAM_EXISTS, None, False),
        (STREAM_EXISTS, 0, True),
        (2, 2, True),
        (2, 1, False),
        (0, None, False),
    ],
)
def test_expectation_met(expected: int | object, revision: int | None, met: bool) -> None:
    assert expectation_met(expected, revision) is met  # type: ignore[arg-type]


# =================================================================== filters


def client_include(pattern: str, text: str) -> bool:
    """Apply an include pattern exactly as the client sends it to the server."""
    return re.search(construct_filter_include_regex([pattern]), text) is not None


def test_categories_become_one_anchored_stream_name_pattern() -> None:
    plan = server_filter(EventFilter(categories=("order", "product")))
    assert plan.by_stream_name
    assert plan.exclude == ()
    assert plan.client_types == ()
    (pattern,) = plan.include
    assert construct_filter_include_regex(plan.include) == "^(?:order|product)-.*$"
    for stream in ("order-1", "order-7f3c-aa", "product-sku-1"):
        assert client_include(pattern, stream), stream
    for stream in ("orders-1", "xorder-1", "order", "inventory-1", "$ce-order", "product"):
        assert not client_include(pattern, stream), stream


def test_category_names_are_matched_literally() -> None:
    pattern = category_pattern(("a.b", "c+d"))
    assert client_include(pattern, "a.b-1")
    assert client_include(pattern, "c+d-1")
    assert not client_include(pattern, "axb-1")
    assert not client_include(pattern, "ccd-1")


def test_types_alone_become_an_event_type_pattern() -> None:
    plan = server_filter(EventFilter(types=("OrderPlaced", "Order.Cancelled")))
    assert plan.include == (type_pattern(("OrderPlaced", "Order.Cancelled")),)
    assert not plan.by_stream_name
    assert plan.client_types == ()
    (pattern,) = plan.include
    assert client_include(pattern, "OrderPlaced")
    assert client_include(pattern, "Order.Cancelled")
    for other in ("OrderPlacedV2", "XOrderPlaced", "OrderXCancelled", "$>"):
        assert not client_include(pattern, other), other


def test_with_both_the_server_filters_categories_and_the_types_are_checked_here() -> None:
    event_filter = EventFilter(categories=("order",), types=("OrderPlaced",))
    plan = server_filter(event_filter)
    assert plan.by_stream_name
    assert plan.client_types == ("OrderPlaced",)
    assert wanted(event_filter, "order-1", "OrderPlaced")
    assert not wanted(event_filter, "order-1", "OrderShipped")


def test_without_a_filter_system_streams_are_excluded() -> None:
    plan = server_filter(None)
    assert plan.by_stream_name
    assert plan.include == ()
    regex = construct_filter_exclude_regex(plan.exclude)
    assert re.search(regex, "order-1")
    for system in ("$$order-1", "$ce-order", "$persistentsubscription-$all::g-parked", "$scavenges"):
        assert not re.search(regex, system), system


def test_system_events_are_never_wanted() -> None:
    assert not wanted(None, "$ce-order", "$>")
    assert not wanted(None, "order-1", "$metadata")
    assert wanted(None, "order-1", "OrderPlaced")


# ================================================================== metadata

METADATA_CASES = [
    b"{}",
    b'{"correlation_id":"c-1","causation_id":"k-1","actor":"alice"}',
    b'{ "spaced" : [1, 2, {"x": null}] }',
    '{"name":"café"}'.encode(),
    b"",
    b"null",
    b"[1,2,3]",
    b'"just a string"',
    b'  {"leading":"space"}',
    b"{not json",
    b'{"$schema_version":9}',
    b'{"$metadata":"tricky"}',
    b'{"a":1,"$metadata_b64":"x"}',
    b"\xff\xfe\x00binary",
]


@pytest.mark.parametrize("metadata", METADATA_CASES)
@pytest.mark.parametrize("schema_version", [0, 1, 2, 17])
def test_metadata_round_trips_byte_for_byte_with_its_schema_version(
    metadata: bytes, schema_version: int
) -> None:
    stored = encode_metadata(metadata, schema_version)

    assert decode_metadata(stored) == (schema_version, metadata)
    decoded = msgspec.json.decode(stored)  # what other KurrentDB tools see: a JSON object
    assert isinstance(decoded, dict)
    assert decoded["$schema_version"] == schema_version


def test_the_schema_version_goes_first_and_the_rest_stays_readable() -> None:
    stored = encode_metadata(b'{"correlation_id":"c-1"}', 3)
    assert stored == b'{"$schema_version":3,"correlation_id":"c-1"}'
    assert encode_metadata(b"{}", 1) == b'{"$schema_version":1}'


@pytest.mark.parametrize("foreign", [b"", b"{}", b'{"correlation_id":"x"}', b"\x00\x01"])
def test_metadata_written_by_other_tools_is_schema_version_one(foreign: bytes) -> None:
    assert decode_metadata(foreign) == (1, foreign)


@pytest.mark.parametrize("metadata", METADATA_CASES)
def test_metadata_stored_by_older_code_reads_back_typed(metadata: bytes) -> None:
    """Older code appended whatever bytes it was given: they read back as typed
    metadata (known keys kept, others ignored, anything but an object empty)."""
    old = raw_event("order-1", 0, 7)
    stored = KdbRecordedEvent(**{**old.__dict__, "metadata": encode_metadata(metadata, 2)})
    recorded = to_recorded(stored)
    assert (recorded.schema_version, recorded.metadata_json) == (2, metadata)
    if metadata == METADATA_CASES[1]:
        assert recorded.metadata == EventMetadata(actor="alice", correlation_id="c-1", causation_id="k-1")
    else:
        assert recorded.metadata == EventMetadata()


def test_typed_metadata_is_stored_after_the_schema_version() -> None:
    typed = EventMetadata(actor="alice", correlation_id="c-1", idempotency_key="k")
    stored = encode_metadata(typed.to_json(), 4)
    assert stored == b'{"$schema_version":4,"actor":"alice","correlation_id":"c-1","idempotency_key":"k"}'
    assert EventMetadata.from_json(decode_metadata(stored)[1]) == typed


# ================================================= positions, retries, parking


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("C:1234/P:1234", 1234),
        ("C:0/P:0", 0),
        ("C:-1/P:-1", None),
        ("", None),
        ("17", 17),
        ("garbage", None),
    ],
)
def test_all_positions_in_subscription_info(text: str, position: int | None) -> None:
    assert parse_all_position(text) == position


def test_max_retry_counts_deliveries_and_the_server_counts_retries() -> None:
    # The server parks when a message's retry count (0 on first delivery) reaches MaxRetryCount.
    assert [server_max_retry_count(n) for n in (1, 2, 5)] == [0, 1, 4]
    assert server_max_retry_count(0) == 0


def test_nack_actions() -> None:
    assert [client_nack_action(a) for a in (NackAction.RETRY, NackAction.PARK, NackAction.SKIP)] == [
        "retry",
        "park",
        "skip",
    ]


def test_the_strategy_pins_streams() -> None:
    assert CONSUMER_STRATEGY == "Pinned"


def test_the_parked_stream_of_a_group_on_all() -> None:
    assert parked_stream("projector-orders") == "$persistentsubscription-$all::projector-orders-parked"


def test_parked_link_metadata_from_the_server() -> None:
    info = parse_parked_link_metadata(
        b'{"Added":"2025-03-01T10:00:00.1234567+01:00","Reason":"Reached retry count of 4",'
        b'"SubscriptionEventNumber":12}'
    )
    assert info.attempts == 5
    assert info.added == datetime(2025, 3, 1, 9, 0, 0, 123456, tzinfo=UTC)
    camel = parse_parked_link_metadata(
        b'{"added":"2025-03-01T10:00:00","reason":"Client explicitly NAK\'ed"}'
    )
    assert camel.reason.startswith("Client explicitly")
    assert camel.attempts is None
    assert camel.added is not None
    assert camel.added.utcoffset() == timedelta(0)
    assert parse_parked_link_metadata(b"not json").reason == ""


# ==================================================== the consumer's bookkeeping


def raw_event(stream: str, revision: int, position: int, type_: str = "Happened") -> KdbRecordedEvent:
    return KdbRecordedEvent(
        type=type_,
        data=b"{}",
        metadata=encode_metadata(b"{}", 1),
        content_type="application/json",
        id=uuid.uuid4(),
        stream_name=stream,
        stream_position=revision,
        commit_position=position,
        prepare_position=position,
        recorded_at=datetime.now(UTC),
        retry_count=0,
    )


def again(raw: KdbRecordedEvent, retry_count: int) -> KdbRecordedEvent:
    """The same event sent again, as the server does on retry."""
    return KdbRecordedEvent(**{**raw.__dict__, "retry_count": retry_count})


class ScriptedRaw:
    """Stands in for the client's AsyncPersistentSubscription: the test pushes what the
    server would send and reads back what the consumer acked and nacked."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[KdbRecordedEvent | None] = asyncio.Queue()
        self.settled: list[tuple[str, uuid.UUID]] = []
        self.stopped = asyncio.Event()

    def __aiter__(self) -> ScriptedRaw:
        return self

    async def __anext__(self) -> KdbRecordedEvent:
        item = await self.incoming.get()
        if item is None or self.stopped.is_set():
            raise StopAsyncIteration
        return item

    async def ack(self, item: uuid.UUID) -> None:
        self.settled.append(("ack", item))

    async def nack(self, item: uuid.UUID, action: str) -> None:
        self.settled.append((action, item))

    async def stop(self, *, timeout: float | None = None) -> None:  # noqa: ASYNC109 (the client's signature)
        self.stopped.set()
        self.incoming.put_nowait(None)


class ScriptedBackend:
    def __init__(self) -> None:
        self.notes: list[ParkNote] = []
        self.checkpoint: int | None = None
        self.previous: dict[tuple[str, int], tuple[int, int]] = {}

    async def true_position(self, raw: KdbRecordedEvent) -> int:
        return raw.commit_position

    async def previous_matching(
        self, stream: str, revision: int, event_filter: EventFilter | None
    ) -> tuple[int, int] | None:
        return self.previous.get((stream, revision))

    async def group_checkpoint(self, group: str) -> int | None:
        return self.checkpoint

    async def write_park_note(self, group: str, note: ParkNote) -> None:
        self.notes.append(note)


async def consumer(
    *,
    event_filter: EventFilter | None = None,
    skip_upto: int | None = None,
    others: int = 0,
    max_retry: int = 5,
    message_timeout: float = 4.0,
    connected: asyncio.Event | None = None,
) -> tuple[KurrentDBPersistentSubscription, ScriptedBackend, list[ScriptedRaw]]:
    backend = ScriptedBackend()
    raws: list[ScriptedRaw] = []

    async def open_raw() -> ScriptedRaw:
        raws.append(ScriptedRaw())
        if connected is not None and len(raws) > 1:
            connected.set()
        return raws[-1]

    async def count_others() -> int:
        return others

    subscription = KurrentDBPersistentSubscription(
        backend=backend,
        group="g",
        open_raw=open_raw,  # type: ignore[arg-type]
        count_other_consumers=count_others,
        event_filter=event_filter,
        skip_upto=skip_upto,
        max_retry=max_retry,
        message_timeout=message_timeout,
    )
    await subscription.connect()
    return subscription, backend, raws


async def next_event(subscription: AsyncIterator[RecordedEvent], seconds: float = 2.0) -> RecordedEvent:
    async with asyncio.timeout(seconds):
        return await anext(subscription)


async def nothing_for(subscription: AsyncIterator[RecordedEvent], seconds: float = 0.2) -> None:
    with pytest.raises(TimeoutError):
        await next_event(subscription, seconds)


async def test_later_events_of_a_retried_stream_wait_for_it() -> None:
    sub, _, (raw,) = await consumer()
    failing, following, other = raw_event("s-1", 0, 10), raw_event("s-1", 1, 20), raw_event("t-1", 0, 30)
    for e in (failing, following, other):
        raw.incoming.put_nowait(e)

    first = await next_event(sub)
    assert first.id == failing.id
    await sub.nack(first, NackAction.RETRY, "boom")
    assert (await next_event(sub)).id == other.id  # other streams go on
    await nothing_for(sub)  # "following" waits for the retried event

    raw.incoming.put_nowait(again(failing, 1))
    redelivered = await next_event(sub)
    assert redelivered.id == failing.id
    await sub.ack(redelivered)
    assert (await next_event(sub)).id == following.id
    assert raw.settled[0] == ("retry", failing.id)
    await sub.close()


async def test_the_last_retry_is_recorded_as_parked_with_its_reason_and_count() -> None:
    sub, backend, (raw,) = await consumer(max_retry=2)
    failing = raw_event("s-1", 0, 10)
    raw.incoming.put_nowait(again(failing, 1))  # the second delivery
    await sub.nack(await next_event(sub), NackAction.RETRY, "still broken")
    assert backend.notes == [
        ParkNote(
            event_id=failing.id, reason="retry limit reached after 2 deliveries: still broken", attempts=2
        )
    ]
    await sub.close()


async def test_park_keeps_the_consumers_reason() -> None:
    sub, backend, (raw,) = await consumer()
    bad = raw_event("s-1", 0, 10)
    raw.incoming.put_nowait(bad)
    await sub.nack(await next_event(sub), NackAction.PARK, "cannot handle")
    assert backend.notes == [ParkNote(event_id=bad.id, reason="cannot handle", attempts=1)]
    assert raw.settled == [("park", bad.id)]
    await sub.close()


async def test_events_outside_the_filter_or_before_the_start_are_acked_unseen() -> None:
    sub, _, (raw,) = await consumer(
        event_filter=EventFilter(categories=("s",), types=("Wanted",)), skip_upto=10
    )
    at_start = raw_event("s-1", 0, 10, "Wanted")
    unwanted = raw_event("s-1", 1, 20, "Other")
    system = raw_event("$ce-s", 0, 25, "$>")
    shown = raw_event("s-1", 2, 30, "Wanted")
    for e in (at_start, unwanted, system, shown):
        raw.incoming.put_nowait(e)

    assert (await next_event(sub)).id == shown.id
    assert raw.settled == [("ack", at_start.id), ("ack", unwanted.id), ("ack", system.id)]
    await sub.close()


async def test_a_consumer_that_holds_an_event_too_long_hands_its_events_back() -> None:
    connected = asyncio.Event()
    sub, _, raws = await consumer(connected=connected)
    slow = raw_event("s-1", 0, 10)
    raws[0].incoming.put_nowait(slow)
    held = await next_event(sub)

    raws[0].incoming.put_nowait(again(slow, 1))  # the server's ack timeout fired
    async with asyncio.timeout(2):
        await raws[0].stopped.wait()

    await sub.ack(held)  # too late: the server has already given it to someone else
    assert raws[0].settled == []
    fresh = raw_event("t-1", 0, 20)

    reconnect = asyncio.create_task(next_event(sub))
    async with asyncio.timeout(2):
        await connected.wait()  # it reconnects when asked for more
    raws[1].incoming.put_nowait(fresh)
    assert (await reconnect).id == fresh.id
    await sub.close()


async def test_a_joining_consumer_waits_for_the_checkpoint_before_a_streams_next_event() -> None:
    sub, backend, (raw,) = await consumer(others=1)
    moved = raw_event("s-1", 3, 40)
    backend.previous[("s-1", 3)] = (2, 30)  # revision 2 may still be in flight elsewhere
    backend.checkpoint = 20
    fresh = raw_event("t-1", 0, 50)
    raw.incoming.put_nowait(moved)
    raw.incoming.put_nowait(fresh)

    assert (await next_event(sub)).id == fresh.id
    await nothing_for(sub, 0.4)
    backend.checkpoint = 30
    assert (await next_event(sub)).id == moved.id
    await sub.close()


async def test_a_consumer_alone_in_its_group_does_not_wait() -> None:
    sub, backend, (raw,) = await consumer(others=0)
    backend.previous[("s-1", 3)] = (2, 30)
    moved = raw_event("s-1", 3, 40)
    raw.incoming.put_nowait(moved)
    assert (await next_event(sub)).id == moved.id
    await sub.close()


# =========================================================== against a server


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


@pytest.mark.kurrentdb
async def test_a_group_is_created_pinned_with_the_port_settings(
    store: KurrentDBEventStore, client: AsyncKurrentDBClient, unique: str
) -> None:
    group = f"group-{unique}"
    await store.create_subscription_group(
        group,
        SubscriptionSettings(
            filter=EventFilter(categories=(f"c{unique}",)), max_retry=4, ack_timeout_seconds=12.5
        ),
    )
    try:
        info = await client.get_subscription_info(group)
        assert info.consumer_strategy == "Pinned"
        assert info.max_retry_count == 3
        assert info.message_timeout == 12.5
        assert (info.min_checkpoint_count, info.checkpoint_after) == (1, 1.0)
        assert info.max_subscriber_count == 0
        assert not info.resolve_links
    finally:
        await store.delete_subscription_group(group)


@pytest.mark.kurrentdb
async def test_other_tools_see_json_metadata_with_the_schema_version(
    store: KurrentDBEventStore, client: AsyncKurrentDBClient, unique: str
) -> None:
    stream = f"order-{unique}"
    new = NewEvent(
        id=uuid.uuid4(), type="Placed", data=b'{"n":1}', metadata=EventMetadata(actor="a"), schema_version=3
    )
    await store.append(stream, [new], NO_STREAM)

    (raw,) = await client.get_stream(stream)
    assert raw.content_type == "application/json"
    assert msgspec.json.decode(raw.metadata) == {"$schema_version": 3, "actor": "a"}
    (recorded,) = await store.read_stream(stream)
    assert (recorded.schema_version, recorded.metadata_json) == (3, b'{"actor":"a"}')
    assert recorded.metadata == EventMetadata(actor="a")
    assert recorded.position == raw.commit_position


@pytest.mark.kurrentdb
async def test_an_idempotent_append_reports_the_stored_position(
    store: KurrentDBEventStore, unique: str
) -> None:
    stream = f"order-{unique}"
    batch = [NewEvent(id=uuid.uuid4(), type="Placed", data=b"{}") for _ in range(3)]
    first = await store.append(stream, batch, NO_STREAM)
    stored = await store.read_stream(stream)

    # The server answers an idempotent append with the stored position (kurrentdbclient's
    # own tests; a position of 0 from older servers is looked up). Without an idempotency
    # key the answer does not say it was a re-append: already_stored stays False.
    assert first == AppendResult(2, stored[2].position)
    again = await store.append(stream, batch, NO_STREAM)
    assert (again.revision, again.position) == (2, stored[2].position)
    prefix = await store.append(stream, batch[:2], NO_STREAM)
    assert (prefix.revision, prefix.position) == (1, stored[1].position)
    assert len(await store.read_stream(stream)) == 3


@pytest.mark.kurrentdb
async def test_reading_all_never_shows_system_streams(store: KurrentDBEventStore) -> None:
    everything = await store.read_all(limit=500)
    assert all(not e.stream.startswith("$") and not e.type.startswith("$") for e in everything)


@pytest.mark.kurrentdb
async def test_parked_events_are_links_in_the_servers_parked_stream(
    store: KurrentDBEventStore, client: AsyncKurrentDBClient, unique: str
) -> None:
    category = f"c{unique}"
    group = f"group-{unique}"
    await store.create_subscription_group(
        group,
        SubscriptionSettings(
            filter=EventFilter(categories=(category,)), from_position=await store.head_position()
        ),
    )
    bad = NewEvent(id=uuid.uuid4(), type="Bad", data=b"{}")
    await store.append(f"{category}-1", [bad], NO_STREAM)
    subscription = await store.connect_subscription_group(group)
    try:
        async with asyncio.timeout(10):
            recorded = await anext(aiter(subscription))
        await subscription.nack(recorded, NackAction.PARK, "bad data")
        for _ in range(100):  # parking is asynchronous on the server
            if await store.list_parked(group):
                break
            await asyncio.sleep(0.1)
    finally:
        await subscription.close()

    links = await client.get_stream(parked_stream(group))
    assert [link.type for link in links] == ["$>"]
    assert links[0].data.decode() == f"0@{category}-1"
    (parked,) = await store.list_parked(group)
    assert (parked.event.id, parked.reason, parked.attempts) == (bad.id, "bad data", 1)
    assert parked.event.position == (await store.read_stream(f"{category}-1"))[0].position
    await store.delete_subscription_group(group)
