"""Event metadata is typed (``EventMetadata``) and reads old stored metadata.

Fixtures in ``tests/fixtures/metadata`` hold metadata exactly as writers stored it
before it was typed (and one written by another tool); they are never edited.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from orderstream.application.commands import CommandContext
from orderstream.events import registry
from orderstream.eventstore.base import EventMetadata, RecordedEvent
from orderstream.eventstore.sqlite import SqliteEventStore
from orderstream.eventstore.sqlite_schema import connect
from orderstream.sagas.fulfilment.activities import context_for
from orderstream.sagas.fulfilment.inputs import SAGA_ACTOR, StepRef

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
EVENT_FIXTURES = sorted((FIXTURES / "events").glob("*.v*.json"))
WRITTEN_BY_ORDERSTREAM = [
    "api-command",
    "api-keyed",
    "api-authenticated",
    "api-traced",
    "saga-step",
    "snapshot",
    "empty",
]
CORRELATION = "6f1c2a9e-3b4d-4e5f-8a7b-9c0d1e2f3a4b"
ORDER_PLACED_ID = "5f0c6d2e-8a3b-4f4e-9a57-0d3c2b1a9e88"

EXPECTED = {
    "api-command": EventMetadata(actor="anonymous", correlation_id=CORRELATION),
    "api-keyed": EventMetadata(
        actor="alice",
        correlation_id="req-42",
        idempotency_key="order-2024-0001",
        request_hash="3f9a0e5571c24b8e8d640c1d2e3f4a5b",
    ),
    "api-authenticated": EventMetadata(actor="alice", correlation_id="req-7", roles="customer"),
    "api-traced": EventMetadata(
        actor="alice",
        correlation_id="req-9",
        roles="customer",
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ),
    "saga-step": EventMetadata(
        actor=SAGA_ACTOR,
        correlation_id="req-42",
        causation_id=ORDER_PLACED_ID,
        idempotency_key="order-fulfilment-3f9a0e55-71c2-4b8e-8d64-0c1d2e3f4a5b/reserve-stock/BOOK-1",
    ),
    "snapshot": EventMetadata(actor="snapshotter", snapshot_of="product-BOOK-1"),
    "empty": EventMetadata(),
    "foreign": EventMetadata(actor="erp-import"),
}


def stored(name: str) -> bytes:
    return (FIXTURES / "metadata" / f"{name}.json").read_bytes().rstrip(b"\n")


def recorded(metadata: bytes) -> RecordedEvent:
    return RecordedEvent(
        id=uuid.uuid4(),
        stream="order-1",
        revision=0,
        position=1,
        type="OrderConfirmed",
        schema_version=1,
        data=b"{}",
        metadata_json=metadata,
        recorded_at=datetime(2025, 1, 1, tzinfo=UTC),
    )


def test_every_fixture_has_its_expectation() -> None:
    assert sorted(p.stem for p in (FIXTURES / "metadata").glob("*.json")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stored_metadata_reads_back_typed(name: str) -> None:
    assert EventMetadata.from_json(stored(name)) == EXPECTED[name]


@pytest.mark.parametrize("name", WRITTEN_BY_ORDERSTREAM)
def test_what_orderstream_wrote_before_is_written_byte_for_byte_now(name: str) -> None:
    """The typed struct's field order is the old dicts' key order: the stored format
    did not change (old code could read new files, although that is not promised)."""
    assert EXPECTED[name].to_json() == stored(name)


def test_the_command_contexts_write_the_metadata_they_wrote_before() -> None:
    api = CommandContext(actor="anonymous", correlation_id=CORRELATION)
    keyed = CommandContext(
        actor="alice",
        correlation_id="req-42",
        idempotency_key="order-2024-0001",
        request_hash="3f9a0e5571c24b8e8d640c1d2e3f4a5b",
    )
    saga = context_for(
        StepRef(
            "order-fulfilment-3f9a0e55-71c2-4b8e-8d64-0c1d2e3f4a5b",
            "reserve-stock/BOOK-1",
            "req-42",
            ORDER_PLACED_ID,
        )
    )
    assert api.metadata().to_json() == stored("api-command")
    assert keyed.metadata().to_json() == stored("api-keyed")
    assert saga.metadata().to_json() == stored("saga-step")
    authenticated = CommandContext(actor="alice", roles="customer", correlation_id="req-7")
    assert authenticated.metadata().to_json() == stored("api-authenticated")
    assert EventMetadata.from_json(stored("api-keyed")).roles is None  # written before roles
    traced = CommandContext(
        actor="alice",
        roles="customer",
        correlation_id="req-9",
        traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    )
    assert traced.metadata().to_json() == stored("api-traced")
    assert EventMetadata.from_json(stored("api-authenticated")).traceparent is None  # written before tracing


def test_empty_strings_in_a_context_are_not_written() -> None:
    context = CommandContext(
        actor="bob", correlation_id="c", causation_id="", idempotency_key="", request_hash=""
    )
    assert context.metadata().to_json() == b'{"actor":"bob","correlation_id":"c"}'


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        (b"", EventMetadata()),
        (b"null", EventMetadata()),
        (b"[1, 2]", EventMetadata()),
        (b'"a string"', EventMetadata()),
        (b"{not json", EventMetadata()),
        (b'{"actor": null, "correlation_id": "c-1"}', EventMetadata(correlation_id="c-1")),
        (b'{"actor": 42, "correlation_id": "c-1"}', EventMetadata(correlation_id="c-1")),
        (b'{"actor": "a", "request_hash": {"md5": "x"}, "x": 1}', EventMetadata(actor="a")),
        (b'{"$schema_version": 2, "actor": "a"}', EventMetadata(actor="a")),
    ],
)
def test_metadata_that_is_not_what_orderstream_writes_still_decodes(
    metadata: bytes, expected: EventMetadata
) -> None:
    assert recorded(metadata).metadata == expected


def test_a_recorded_events_metadata_is_decoded_once_and_does_not_change_its_identity() -> None:
    event = recorded(stored("api-keyed"))
    copy = msgspec.structs.replace(event)

    assert event.metadata is event.metadata  # decoded on first use, then kept
    assert event == copy  # the cached value is not a field: equality, hash and encoding ignore it
    assert hash(event) == hash(copy)
    assert msgspec.json.encode(event) == msgspec.json.encode(copy)
    assert "_metadata" not in msgspec.to_builtins(event)


INSERT_AS_OLD_CODE = (
    "INSERT INTO events (id, stream, category, revision, type, schema_version, data, metadata, recorded_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, '2023-06-01T08:15:00+00:00')"
)


async def test_old_files_load_events_and_metadata(tmp_path: Path) -> None:
    """A store file whose rows old code wrote (every event fixture, each with one of
    the metadata fixtures) loads: every event decodes, every metadata reads typed."""
    path = tmp_path / "events.db"
    await (await SqliteEventStore.open(path)).close()
    names = sorted(EXPECTED)
    rows = []
    for n, fixture in enumerate(EVENT_FIXTURES):
        type_name, version = fixture.name.split(".")[0], int(fixture.name.split(".")[1][1:])
        data = msgspec.json.encode(msgspec.json.decode(fixture.read_bytes())).decode()
        rows.append(
            (
                str(uuid.uuid4()),
                "old-1",
                "old",
                n,
                type_name,
                version,
                data,
                stored(names[n % len(names)]).decode(),
            )
        )
    with contextlib.closing(connect(str(path), writer=True)) as conn:
        # A schema-1 file, as the code before idempotency records left it.
        conn.executescript("DROP TABLE idempotency; DROP TABLE idempotency_legacy; PRAGMA user_version = 1;")
        conn.execute("BEGIN")
        conn.executemany(INSERT_AS_OLD_CODE, rows)
        conn.execute("COMMIT")

    store = await SqliteEventStore.open(path)
    try:
        loaded = await store.read_stream("old-1")
        # The keys of old files are found by their metadata: the stored names did not change.
        record = await store.find_idempotency("alice", "order-2024-0001", "old-1")
    finally:
        await store.close()
    assert len(loaded) == len(EVENT_FIXTURES) > 0
    for n, event in enumerate(loaded):
        registry.decode(event)  # upcast and decoded, as before
        assert event.metadata == EXPECTED[names[n % len(names)]]
        assert event.metadata_json.decode() == rows[n][7]  # the stored bytes, untouched
    keyed = [e for e in loaded if e.metadata.idempotency_key == "order-2024-0001"]
    assert record is not None
    assert (record.revision, record.request_hash) == (keyed[-1].revision, keyed[-1].metadata.request_hash)
