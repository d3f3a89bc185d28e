"""Snapshots of aggregate state, stored in the event store itself.

The KurrentDB convention, which works on every backend: the snapshots of stream
``product-SKU-1`` are events of type ``Snapshot`` in the stream
``snapshot-product-SKU-1`` (category ``snapshot``: projections and the saga
trigger subscribe by their own categories and never see them). The data is
readable JSON::

    {"revision": 199, "position": 5321, "schema": "3f9c...", "state": {...},
     "keys": [{"actor": ..., "key": ..., "request_hash": ..., "revision": ..., "position": ...}]}

A snapshot is an optimisation, never a source of truth. It is used only when

- its ``schema`` is the current schema id of the decider's state type (a hash of
  the state Struct's msgspec JSON schema), so a changed state shape falls back to
  a full fold instead of decoding old data into new meanings;
- its data decodes into that type;
- the stream's event at ``revision`` still has commit position ``position`` (the
  handler checks this when it reads the tail), so a snapshot that does not
  belong to this history is ignored too.

``keys`` carries the idempotency records of the stream's keyed commands (the
last event of each), the newest :data:`DEFAULT_KEY_WINDOW` by revision: the
idempotency window of a stream that has snapshots. Commands since the latest
snapshot are found in the tail events, as before.

Writing is off the command's critical path: :meth:`SnapshotStore.after_append`
starts a background task (at most one per stream, a bounded number at once,
failures logged and counted, never raised to the command), and
:meth:`SnapshotStore.close` waits for those in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec

from orderstream.eventstore.base import ANY, EventStore, NewEvent, RecordedEvent

log = logging.getLogger("orderstream.snapshots")

S = TypeVar("S")

SNAPSHOT_CATEGORY = "snapshot"
SNAPSHOT_EVENT_TYPE = "Snapshot"
DEFAULT_SNAPSHOT_EVERY = 100
DEFAULT_KEY_WINDOW = 1_000
"""Idempotency records kept per stream in a snapshot (the idempotency window)."""
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_MAX_PENDING = 1_000
SNAPSHOT_NAMESPACE = uuid.UUID("0b6f5b8e-7d2a-4c43-9a1e-5f3c2d7e8a90")
MIXED_HASHES = "!mixed"
"""``request_hash`` of a record whose key was seen with several digests (not a hex
digest, so it never matches a request: the key is refused, as a full fold would)."""

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9 ._:~/-]*$")
"""Keys whose JSON encoding is the key itself in every encoder: for these a byte
search of the stored records can rule a key out without decoding them."""


def snapshot_stream(stream: str) -> str:
    """``product-SKU-1`` -> ``snapshot-product-SKU-1``."""
    return f"{SNAPSHOT_CATEGORY}-{stream}"


_schema_ids: dict[object, str] = {}
_state_decoders: dict[object, msgspec.json.Decoder[Any]] = {}


def state_schema_id(state_type: object) -> str:
    """A digest of the state type's msgspec JSON schema (computed once per type).

    It changes with any field, type, default or constraint of the state (and of
    the Structs inside it), so snapshots of an older shape are ignored."""
    found = _schema_ids.get(state_type)
    if found is None:
        schema = msgspec.json.encode(msgspec.json.schema(state_type), order="deterministic")
        found = _schema_ids[state_type] = hashlib.sha256(schema).hexdigest()[:32]
    return found


def _state_decoder(state_type: object) -> msgspec.json.Decoder[Any]:
    found = _state_decoders.get(state_type)
    if found is None:
        found = _state_decoders[state_type] = msgspec.json.Decoder(state_type)
    return found


class IdempotencyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The last event a keyed command appended to the stream."""

    actor: str
    key: str
    request_hash: str | None
    revision: int
    position: int


class SnapshotData(msgspec.Struct, kw_only=True):
    """The ``Snapshot`` event's data. ``state`` and ``keys`` stay raw JSON until needed."""

    revision: int
    position: int
    schema: str
    state: msgspec.Raw
    keys: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"[]"))
    keys_complete: bool = True
    """False once the window dropped a key: a key not among ``keys`` may still be
    in the events before the snapshot."""


_data_decoder = msgspec.json.Decoder(SnapshotData)
_records_decoder = msgspec.json.Decoder(list[IdempotencyRecord])
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class Snapshot:
    """A snapshot that was read and accepted (its state is returned beside it)."""

    stream: str
    revision: int
    position: int
    keys: bytes
    """The idempotency records as stored (JSON array); decoded on demand."""
    keys_complete: bool = True
    """Whether ``keys`` holds every keyed command before the snapshot."""

    def records(self) -> list[IdempotencyRecord]:
        return _records_decoder.decode(self.keys)

    def lookup(self, actor: str, key: str) -> IdempotencyRecord | None:
        """The record of this actor's key, if the snapshot has one."""
        if _PLAIN_KEY.match(key) and key.encode() not in self.keys:
            return None  # the common case (a new key) without decoding thousands of records
        for record in self.records():
            if record.key == key and record.actor == actor:
                return record
        return None


def records_of(events: Iterable[RecordedEvent]) -> dict[tuple[str, str], IdempotencyRecord]:
    """Idempotency records from events' metadata: per (actor, key), the last event."""
    found: dict[tuple[str, str], IdempotencyRecord] = {}
    for event in events:
        meta = event.metadata_dict()
        key = meta.get("idempotency_key")
        actor = meta.get("actor")
        if not isinstance(key, str) or not isinstance(actor, str):
            continue
        digest = meta.get("request_hash")
        earlier = found.get((actor, key))
        if earlier is not None and earlier.request_hash != digest:
            digest = MIXED_HASHES
        found[(actor, key)] = IdempotencyRecord(
            actor=actor,
            key=key,
            request_hash=digest if isinstance(digest, str) else None,
            revision=event.revision,
            position=event.position,
        )
    return found


def merge_records(
    older: Iterable[IdempotencyRecord], newer: Iterable[IdempotencyRecord], window: int
) -> list[IdempotencyRecord]:
    """``older`` updated by ``newer``; the newest ``window`` by revision, oldest first
    (fewer than both together when the window dropped some)."""
    merged: dict[tuple[str, str], IdempotencyRecord] = {(r.actor, r.key): r for r in older}
    for record in newer:
        earlier = merged.get((record.actor, record.key))
        if earlier is not None and earlier.request_hash != record.request_hash:
            record = msgspec.structs.replace(record, request_hash=MIXED_HASHES)
        merged[(record.actor, record.key)] = record
    ordered = sorted(merged.values(), key=lambda r: r.revision)
    return ordered[-window:] if window > 0 else []


@dataclass
class SnapshotStats:
    written: int = 0
    failed: int = 0
    skipped: int = 0
    """Not started: one already in flight for the stream, or too many pending."""
    ignored: int = 0
    """Read but not used (other schema, undecodable, not of this history)."""


@dataclass(frozen=True)
class PendingSnapshot(Generic[S]):
    """What a background write needs: the state at ``revision`` and where its
    idempotency records come from."""

    stream: str
    state: S
    schema: str
    revision: int
    position: int
    base: Snapshot | None
    """The snapshot the command loaded from (its records are carried over)."""
    events: Sequence[RecordedEvent]
    """The events the command folded after ``base`` (all of them without one)."""
    appended: IdempotencyRecord | None
    """The command's own record, if it had a key."""


@dataclass(eq=False)
class SnapshotStore:
    """Reads and writes snapshots; owns the background writes."""

    event_store: EventStore
    every: int = DEFAULT_SNAPSHOT_EVERY
    """Snapshot when the stream is this many events past its latest snapshot; 0: never."""
    key_window: int = DEFAULT_KEY_WINDOW
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    max_pending: int = DEFAULT_MAX_PENDING
    stats: SnapshotStats = field(default_factory=SnapshotStats)
    _in_flight: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False)
    _semaphore: asyncio.Semaphore | None = field(default=None, init=False)
    _closed: bool = field(default=False, init=False)
    _recent: dict[str, int] = field(default_factory=dict, init=False)
    """Revision of the latest snapshot started here, per stream (the newest
    ``max_pending`` streams): commands that loaded the older one while it was
    being written do not start another right after it."""

    @property
    def enabled(self) -> bool:
        return self.every > 0

    @property
    def in_flight(self) -> list[str]:
        """Streams whose snapshot is being written (or waits for its turn)."""
        return list(self._in_flight)

    # ------------------------------------------------------------------ reading

    async def read(
        self, state_type: type[S], stream: str, *, up_to: int | None = None
    ) -> tuple[Snapshot, S] | None:
        """The latest usable snapshot of ``stream`` (at or below ``up_to``) and its state.

        ``None`` when there is none, or when the latest one is above ``up_to``, of
        another schema, or undecodable (the caller folds the whole stream)."""
        recorded = await self.event_store.read_stream(snapshot_stream(stream), backwards=True, limit=1)
        if not recorded:
            return None
        event = recorded[0]
        schema = state_schema_id(state_type)
        try:
            if event.type != SNAPSHOT_EVENT_TYPE:
                raise ValueError(f"event type {event.type!r}")
            data = _data_decoder.decode(event.data)
            if data.schema != schema:
                raise ValueError(f"schema {data.schema!r}, current {schema!r}")
            if up_to is not None and data.revision > up_to:
                return None  # not an error: an older revision was asked for
            state: S = _state_decoder(state_type).decode(data.state)
        except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.ignored(stream, f"{exc}")
            return None
        snapshot = Snapshot(stream, data.revision, data.position, bytes(data.keys), data.keys_complete)
        return snapshot, state

    def ignored(self, stream: str, why: str) -> None:
        self.stats.ignored += 1
        log.warning("snapshot of %s ignored (%s); folding the whole stream", stream, why)

    # ------------------------------------------------------------------ writing

    def due(self, stream: str, base: Snapshot | None, revision: int) -> bool:
        latest = max(-1 if base is None else base.revision, self._recent.get(stream, -1))
        return self.enabled and revision - latest >= self.every

    def after_append(self, pending: PendingSnapshot[Any]) -> None:
        """Write a snapshot in the background if the policy says so. Never raises."""
        if self._closed or not self.due(pending.stream, pending.base, pending.revision):
            return
        if pending.stream in self._in_flight or len(self._in_flight) >= self.max_pending:
            self.stats.skipped += 1  # the next append on the stream asks again
            return
        self._recent.pop(pending.stream, None)
        self._recent[pending.stream] = pending.revision
        if len(self._recent) > self.max_pending:
            del self._recent[next(iter(self._recent))]
        task = asyncio.create_task(self._write(pending), name=f"snapshot:{pending.stream}")
        self._in_flight[pending.stream] = task

        def done(_: asyncio.Task[None], stream: str = pending.stream) -> None:
            if self._in_flight.get(stream) is task:
                del self._in_flight[stream]

        task.add_done_callback(done)

    async def _write(self, pending: PendingSnapshot[Any]) -> None:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(max(1, self.max_concurrent))
        async with self._semaphore:
            try:
                await self.write(pending)
            except Exception:
                self.stats.failed += 1
                if self._recent.get(pending.stream) == pending.revision:
                    del self._recent[pending.stream]  # let the next append try again
                log.exception("snapshot of %s at revision %d failed", pending.stream, pending.revision)

    async def write(self, pending: PendingSnapshot[Any]) -> None:
        """Append the snapshot now (the background task's body; tests and tools may call it)."""
        older = pending.base.records() if pending.base is not None else []
        newer = list(records_of(pending.events).values())
        if pending.appended is not None:
            newer.append(pending.appended)
        records = merge_records(older, newer, self.key_window)
        complete = (pending.base is None or pending.base.keys_complete) and len(records) == len(
            {(r.actor, r.key) for r in (*older, *newer)}
        )
        data = SnapshotData(
            revision=pending.revision,
            position=pending.position,
            schema=pending.schema,
            state=msgspec.Raw(_encoder.encode(pending.state)),
            keys=msgspec.Raw(_encoder.encode(records)),
            keys_complete=complete,
        )
        scope = f"{pending.stream}\x1f{pending.revision}\x1f{pending.schema}"
        event = NewEvent(
            id=uuid.uuid5(SNAPSHOT_NAMESPACE, scope),
            type=SNAPSHOT_EVENT_TYPE,
            data=_encoder.encode(data),
            metadata=_encoder.encode({"actor": "snapshotter", "snapshot_of": pending.stream}),
        )
        await self.event_store.append(snapshot_stream(pending.stream), [event], ANY)
        self.stats.written += 1

    async def drain(self) -> None:
        """Wait for every snapshot write in flight."""
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight.values()), return_exceptions=True)

    async def close(self) -> None:
        """Start no more writes; wait for those in flight."""
        self._closed = True
        await self.drain()
