"""Snapshots in operation: written in the background every N events, never trusted
blindly, and idempotency keys that outlive the events a load still reads (the store
keeps them apart from snapshots; old stores' keys are still found).

Real ``SqliteEventStore`` in ``tmp_path``; the one stand-in is
:class:`SnapshotsFail`, which wraps the real store and refuses appends to snapshot
streams (a full disk for snapshots only), to show a failed write never reaches
the command.
"""

from __future__ import annotations

import logging
import sqlite3
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from orderstream.application.commands import (
    CommandContext,
    CommandHandler,
    IdempotencyKeyReused,
    request_digest,
)
from orderstream.application.snapshots import SnapshotStore, snapshot_stream, state_schema_id
from orderstream.application.use_cases import UseCases
from orderstream.domain import inventory
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.base import (
    ANY,
    AppendResult,
    EventMetadata,
    EventStoreError,
    Expected,
    IdempotencyClaim,
    NewEvent,
)
from orderstream.eventstore.sqlite import SqliteEventStore

SKU = "SKU-1"
STREAM = inventory.stream_name(SKU)
EUR = Money(1999, "EUR")
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    store = await SqliteEventStore.open(tmp_path / "events.db")
    try:
        yield store
    finally:
        await store.close()


def keyed(key: str, quantity: int, actor: str = "alice") -> CommandContext:
    return CommandContext(
        actor=actor, idempotency_key=key, request_hash=request_digest({"quantity": quantity})
    )


async def register(use_cases: UseCases) -> None:
    await use_cases.register_product(SKU, "Widget", EUR, CommandContext(actor="admin"))


async def snapshot_revisions(store: SqliteEventStore, stream: str = STREAM) -> list[int]:
    events = await store.read_stream(snapshot_stream(stream))
    return [msgspec.json.decode(e.data)["revision"] for e in events]


async def bulk_stock(store: SqliteEventStore, count: int) -> None:
    """``count`` keyed StockAdded events appended directly (fast), as other clients'
    commands: each with its idempotency record, as the handler appends them."""
    for start in range(0, count, 250):
        numbers = range(start, min(count, start + 250))
        batch = [
            registry.to_new_event(
                inventory.StockAdded(sku=SKU, quantity=1, at=NOW),
                event_id=uuid.uuid4(),
                metadata=EventMetadata(actor="bob", idempotency_key=f"bulk-{n}", request_hash="0" * 32),
            )
            for n in numbers
        ]
        claims = [
            IdempotencyClaim(actor="bob", key=f"bulk-{n}", request_hash="0" * 32, last=i)
            for i, n in enumerate(numbers)
        ]
        await store.append(STREAM, batch, ANY, idempotency=claims)


# ------------------------------------------------------------------------- the policy


async def test_a_snapshot_is_written_every_n_events_off_the_commands_path(store: SqliteEventStore) -> None:
    snapshots = SnapshotStore(store, every=10)
    use_cases = UseCases(CommandHandler(store, registry, snapshots=snapshots))
    await register(use_cases)
    for n in range(1, 36):
        result = await use_cases.add_stock(SKU, 1, CommandContext(actor="alice"))
        assert result.revision == n
        if n == 9:
            # The command has answered, and its snapshot is still only scheduled.
            assert snapshots.in_flight == [STREAM]
            assert await snapshot_revisions(store) == []
            await snapshots.drain()
            assert await snapshot_revisions(store) == [9]
    await snapshots.close()
    assert await snapshot_revisions(store) == [9, 19, 29]
    assert snapshots.stats.failed == 0
    loaded = await CommandHandler(store, registry, snapshots=snapshots).load(inventory.decider, STREAM)
    assert loaded.snapshot is not None
    assert loaded.snapshot.revision == 29
    assert [e.revision for e in loaded.events] == list(range(30, 36))
    assert loaded.state.on_hand == 35


class SnapshotsFail:
    """The real store, except that appends to snapshot streams fail."""

    def __init__(self, inner: SqliteEventStore) -> None:
        self.inner = inner

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        expected: Expected,
        *,
        idempotency: Sequence[IdempotencyClaim] = (),
    ) -> AppendResult:
        if stream.startswith("snapshot-"):
            raise EventStoreError("disk full (snapshots only)")
        return await self.inner.append(stream, events, expected, idempotency=idempotency)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_a_failed_snapshot_write_is_logged_and_never_reaches_the_command(
    store: SqliteEventStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Logged once per outage (a full disk fails every write), then a summary."""
    failing: Any = SnapshotsFail(store)
    snapshots = SnapshotStore(failing, every=3)
    use_cases = UseCases(CommandHandler(failing, registry, snapshots=snapshots))
    await register(use_cases)
    with caplog.at_level(logging.WARNING, logger="orderstream.snapshots"):
        for _ in range(8):
            await use_cases.add_stock(SKU, 2, CommandContext())
            await snapshots.drain()
    assert snapshots.stats.failed >= 2  # and each later append tried again
    assert await store.stream_revision(STREAM) == 8
    assert await snapshot_revisions(store) == []
    failures = [r for r in caplog.records if "snapshot writes: failed" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    assert "snapshot of product-SKU-1" in failures[0].getMessage()
    assert "working again" not in caplog.text

    snapshots.event_store = store  # space again: the next write goes through
    with caplog.at_level(logging.WARNING, logger="orderstream.snapshots"):
        for _ in range(3):
            await use_cases.add_stock(SKU, 2, CommandContext())
            await snapshots.drain()
    await snapshots.close()
    assert await snapshot_revisions(store)
    assert "snapshot writes: working again after" in caplog.text
    assert f"and {snapshots.stats.failed} failed attempts" in caplog.text


async def test_snapshot_every_zero_writes_and_reads_none(store: SqliteEventStore) -> None:
    on = CommandHandler(store, registry, snapshots=SnapshotStore(store, every=2))
    await register(UseCases(on))
    for _ in range(4):
        await UseCases(on).add_stock(SKU, 1, CommandContext())
    await on.close()
    assert await snapshot_revisions(store)
    off_store = SnapshotStore(store, every=0)
    off = CommandHandler(store, registry, snapshots=off_store)
    for _ in range(4):
        await UseCases(off).add_stock(SKU, 1, CommandContext())
    assert (await off.load(inventory.decider, STREAM)).snapshot is None
    await off.close()
    assert off_store.stats.written == 0


# ----------------------------------------------------------------- never trusted blindly


async def history_with_snapshot(store: SqliteEventStore) -> CommandHandler:
    handler = CommandHandler(store, registry, snapshots=SnapshotStore(store, every=50))
    use_cases = UseCases(handler)
    await register(use_cases)
    for n in range(60):
        await use_cases.add_stock(SKU, n + 1, CommandContext())
    await handler.close()
    assert await snapshot_revisions(store) == [49]
    return CommandHandler(store, registry, snapshots=SnapshotStore(store, every=50))


async def put_snapshot(store: SqliteEventStore, data: bytes, event_type: str = "Snapshot") -> None:
    event = NewEvent(id=uuid.uuid4(), type=event_type, data=data)
    await store.append(snapshot_stream(STREAM), [event], ANY)


def valid_data(**changes: Any) -> dict[str, Any]:
    return {
        "revision": 55,
        "position": 0,
        "schema": state_schema_id(inventory.Product),
        "state": {"registered": True, "sku": SKU, "name": "Forged", "on_hand": 10**6},
        "keys": [],
    } | changes


@pytest.mark.parametrize(
    ("why", "data", "event_type"),
    [
        ("another schema", valid_data(schema="0" * 32), "Snapshot"),
        ("not a snapshot object", None, "Snapshot"),
        ("state does not decode", valid_data(state={"on_hand": "many"}), "Snapshot"),
        ("a missing field", {k: v for k, v in valid_data().items() if k != "schema"}, "Snapshot"),
        ("not of this history (position)", valid_data(), "Snapshot"),
        ("another event type", valid_data(), "SnapshotV0"),
    ],
)
async def test_a_snapshot_that_cannot_be_trusted_is_ignored(
    store: SqliteEventStore, why: str, data: dict[str, Any] | None, event_type: str
) -> None:
    handler = await history_with_snapshot(store)
    reference = await CommandHandler(store, registry).load(inventory.decider, STREAM)
    if data is not None and why.startswith("not of this history"):
        data["position"] = reference.position  # revision 55 never had the head's position
    raw = b'["revision", 55]' if data is None else msgspec.json.encode(data)
    await put_snapshot(store, raw, event_type)
    loaded = await handler.load(inventory.decider, STREAM)
    assert loaded.snapshot is None, why
    assert loaded.state == reference.state
    assert loaded.state.name == "Widget"
    assert (loaded.revision, loaded.position) == (reference.revision, reference.position)
    assert handler.snapshots is not None
    assert handler.snapshots.stats.ignored == 1


async def test_up_to_below_the_snapshot_folds_from_the_start(store: SqliteEventStore) -> None:
    handler = await history_with_snapshot(store)
    full = CommandHandler(store, registry)
    for up_to in (0, 20, 48):
        loaded = await handler.load(inventory.decider, STREAM, up_to=up_to)
        assert loaded.snapshot is None
        assert loaded.state == (await full.load(inventory.decider, STREAM, up_to=up_to)).state
        assert loaded.revision == up_to
    for up_to in (49, 50, 60):
        loaded = await handler.load(inventory.decider, STREAM, up_to=up_to)
        assert loaded.snapshot is not None
        assert loaded.state == (await full.load(inventory.decider, STREAM, up_to=up_to)).state
        assert loaded.revision == up_to
    assert handler.snapshots is not None
    assert handler.snapshots.stats.ignored == 0


# --------------------------------------------------------------------------- idempotency


async def test_a_key_used_500_events_before_the_snapshot_still_replays(store: SqliteEventStore) -> None:
    snapshots = SnapshotStore(store, every=100)
    handler = CommandHandler(store, registry, snapshots=snapshots)
    use_cases = UseCases(handler)
    await register(use_cases)
    first = await use_cases.add_stock(SKU, 5, keyed("k-old", 5))
    assert first.revision == 1
    await bulk_stock(store, 600)
    for n in range(3):  # commands that take the stream past snapshots
        await use_cases.add_stock(SKU, 1, keyed(f"k-new-{n}", 1))
        await snapshots.drain()
    loaded = await handler.load(inventory.decider, STREAM)
    assert loaded.snapshot is not None
    assert loaded.snapshot.revision - first.revision >= 500
    assert all(e.revision > loaded.snapshot.revision for e in loaded.events)  # k-old is not read
    head = await store.stream_revision(STREAM)
    assert head is not None

    again = await use_cases.add_stock(SKU, 5, keyed("k-old", 5))
    assert again.replayed
    assert (again.revision, again.position) == (first.revision, first.position)
    assert again.appended == ()
    with pytest.raises(IdempotencyKeyReused):
        await use_cases.add_stock(SKU, 6, keyed("k-old", 6))
    other_actor = await use_cases.add_stock(SKU, 5, keyed("k-old", 5, actor="carol"))
    assert not other_actor.replayed  # keys are scoped by actor
    assert await store.stream_revision(STREAM) == head + 1

    # Keys of the events after the snapshot are found alike: the store keeps them all.
    tail_key = await use_cases.add_stock(SKU, 1, keyed("k-new-2", 1))
    assert tail_key.replayed
    with pytest.raises(IdempotencyKeyReused):
        await use_cases.add_stock(SKU, 2, keyed("k-new-2", 2))
    # And the bulk clients' keys, written between snapshots.
    bulk = await handler.handle(
        inventory.decider,
        STREAM,
        inventory.AddStock(sku=SKU, quantity=1, now=handler.clock()),
        context=CommandContext(actor="bob", idempotency_key="bulk-17", request_hash="0" * 32),
    )
    assert bulk.replayed
    assert bulk.revision == 2 + 17
    await handler.close()


def downgrade_to_schema_1(path: Path) -> None:
    """Make ``path`` what a store written before the idempotency table looks like."""
    conn = sqlite3.connect(path)
    try:
        conn.executescript("DROP TABLE idempotency; DROP TABLE idempotency_legacy; PRAGMA user_version = 1;")
    finally:
        conn.close()


async def test_keys_of_a_store_written_before_the_idempotency_table_still_replay(tmp_path: Path) -> None:
    """Old stores kept keys only in event metadata: after the upgrade those keys are
    found by the slow search (of their stream's events up to the upgrade), and the
    keys used since have their records."""
    path = tmp_path / "old.db"
    old = await SqliteEventStore.open(path)
    await old.append(
        STREAM,
        [
            registry.to_new_event(
                inventory.ProductRegistered(sku=SKU, name="Widget", price=EUR, at=NOW),
                event_id=uuid.uuid4(),
                metadata=EventMetadata(actor="admin"),
            )
        ],
        ANY,
    )
    context = keyed("k-old", 5)
    handler = CommandHandler(old, registry)
    first = await handler.handle(
        inventory.decider, STREAM, inventory.AddStock(sku=SKU, quantity=5, now=NOW), context=context
    )
    await old.close()
    downgrade_to_schema_1(path)  # as if "first" had been written by the old code

    store = await SqliteEventStore.open(path)
    try:
        use_cases = UseCases(CommandHandler(store, registry))
        again = await use_cases.add_stock(SKU, 5, keyed("k-old", 5))
        assert again.replayed
        assert (again.revision, again.position) == (first.revision, first.position)
        with pytest.raises(IdempotencyKeyReused):
            await use_cases.add_stock(SKU, 6, keyed("k-old", 6))
        # Also when looked up with others (a batch of commands).
        found = await store.find_idempotency_many(STREAM, [("alice", "k-old"), ("alice", "k-none")])
        assert list(found) == [("alice", "k-old")]
        assert found[("alice", "k-old")].revision == first.revision
        new = await use_cases.add_stock(SKU, 1, keyed("k-new", 1))
        assert (await use_cases.add_stock(SKU, 1, keyed("k-new", 1))).revision == new.revision
        assert await store.stream_revision(STREAM) == first.revision + 1
    finally:
        await store.close()


async def test_events_stored_without_their_record_are_found_by_their_ids(
    store: SqliteEventStore, tmp_path: Path
) -> None:
    """The gap a backend without multi-stream transactions can leave (KurrentDB: the
    events appended, the process gone before the idempotency record): the store
    refuses the key's derived ids again, and the handler then finds the earlier
    answer in the stream's metadata instead of appending twice."""
    use_cases = UseCases(CommandHandler(store, registry))
    await register(use_cases)
    first = await use_cases.add_stock(SKU, 5, keyed("k-gap", 5))
    await use_cases.add_stock(SKU, 1, CommandContext())
    conn = sqlite3.connect(tmp_path / "events.db")
    with conn:
        conn.execute("DELETE FROM idempotency WHERE key = 'k-gap'")
    conn.close()
    assert await store.find_idempotency("alice", "k-gap", STREAM) is None

    again = await use_cases.add_stock(SKU, 5, keyed("k-gap", 5))
    assert again.replayed
    assert (again.revision, again.position) == (first.revision, first.position)
    assert await store.stream_revision(STREAM) == 2
