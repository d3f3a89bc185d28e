"""Snapshots of aggregate state, stored in the event store itself.

The KurrentDB convention, which works on every backend: the snapshots of stream
``product-SKU-1`` are events of type ``Snapshot`` in the stream
``snapshot-product-SKU-1`` (category ``snapshot``: projections and the saga
trigger subscribe by their own categories and never see them). The data is
readable JSON::

    {"revision": 199, "position": 5321, "schema": "v1:3f9c...", "state": {...}}

A snapshot is an optimisation, never a source of truth. It is used only when

- its ``schema`` is the current :func:`state_schema_id` of the decider's state
  type: the explicit ``SNAPSHOT_VERSION`` declared on the state type (bump it when
  the meaning of a field changes) and a digest of the state's structure (field
  names, types, defaults; docstrings do not count), so a changed state falls back
  to a full fold instead of decoding old data into new meanings;
- its data decodes into that type;
- the stream's event at ``revision`` still has commit position ``position`` (the
  handler checks this when it reads the tail), so a snapshot that does not
  belong to this history is ignored too.

Idempotency records are not in snapshots: the event store keeps them
(:meth:`~orderstream.eventstore.base.EventStore.find_idempotency`). Snapshots
written by older versions carry a ``keys`` field; it is ignored.

Writing is off the command's critical path: :meth:`SnapshotStore.after_append`
starts a background task (at most one per stream, a bounded number at once,
failures logged and counted, never raised to the command), and
:meth:`SnapshotStore.close` waits for those in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import msgspec

from orderstream.application.outage_log import OutageLog
from orderstream.eventstore.base import ANY, EventMetadata, EventStore, NewEvent

log = logging.getLogger("orderstream.snapshots")

S = TypeVar("S")

SNAPSHOT_CATEGORY = "snapshot"
SNAPSHOT_EVENT_TYPE = "Snapshot"
DEFAULT_SNAPSHOT_EVERY = 100
DEFAULT_MAX_CONCURRENT = 2
DEFAULT_MAX_PENDING = 1_000
SNAPSHOT_VERSION_ATTRIBUTE = "SNAPSHOT_VERSION"
"""The class variable of a state type that holds its explicit snapshot version."""
SNAPSHOT_NAMESPACE = uuid.UUID("0b6f5b8e-7d2a-4c43-9a1e-5f3c2d7e8a90")


def snapshot_stream(stream: str) -> str:
    """``product-SKU-1`` -> ``snapshot-product-SKU-1``."""
    return f"{SNAPSHOT_CATEGORY}-{stream}"


_schema_ids: dict[object, str] = {}
_state_decoders: dict[object, msgspec.json.Decoder[Any]] = {}


def state_schema_id(state_type: object) -> str:
    """``v{SNAPSHOT_VERSION}:{structural digest}`` of a state type (computed once per type).

    The version is explicit: ``SNAPSHOT_VERSION`` on the state type (1 when absent),
    bumped by hand when a field keeps its shape but changes its meaning. The digest
    covers the msgspec JSON schema without its prose (``title``/``description``), so
    an added or retyped field invalidates old snapshots and a reworded docstring
    does not."""
    found = _schema_ids.get(state_type)
    if found is None:
        version = getattr(state_type, SNAPSHOT_VERSION_ATTRIBUTE, 1)
        schema = msgspec.json.encode(_without_prose(msgspec.json.schema(state_type)), order="deterministic")
        found = _schema_ids[state_type] = f"v{version}:{hashlib.sha256(schema).hexdigest()[:32]}"
    return found


def _without_prose(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _without_prose(v) for k, v in schema.items() if k not in ("title", "description")}
    if isinstance(schema, list):
        return [_without_prose(v) for v in schema]
    return schema


def _state_decoder(state_type: object) -> msgspec.json.Decoder[Any]:
    found = _state_decoders.get(state_type)
    if found is None:
        found = _state_decoders[state_type] = msgspec.json.Decoder(state_type)
    return found


class SnapshotData(msgspec.Struct, kw_only=True):
    """The ``Snapshot`` event's data. ``state`` stays raw JSON until needed."""

    revision: int
    position: int
    schema: str
    state: msgspec.Raw


_data_decoder = msgspec.json.Decoder(SnapshotData)
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class Snapshot:
    """A snapshot that was read and accepted (its state is returned beside it)."""

    stream: str
    revision: int
    position: int


@dataclass
class SnapshotStats:
    written: int = 0
    failed: int = 0
    skipped: int = 0
    """Not started: one already in flight for the stream, or too many pending."""
    ignored: int = 0
    """Read but not used (other schema, undecodable, not of this history)."""
    hits: int = 0
    """Read and decoded."""
    misses: int = 0
    """None stored for the stream (or only one above the revision asked for)."""
    observer: Callable[[str], None] | None = None
    """Told the name of each counter incremented (how metrics see them in every process)."""

    def count(self, name: Literal["written", "failed", "skipped", "ignored", "hits", "misses"]) -> None:
        setattr(self, name, getattr(self, name) + 1)
        if self.observer is not None:
            self.observer(name)


@dataclass(frozen=True)
class PendingSnapshot(Generic[S]):
    """What a background write needs: the state at ``revision``."""

    stream: str
    state: S
    schema: str
    revision: int
    position: int
    base: Snapshot | None
    """The snapshot the command loaded from (for the "is one due" policy)."""


@dataclass(eq=False)
class SnapshotStore:
    """Reads and writes snapshots; owns the background writes."""

    event_store: EventStore
    every: int = DEFAULT_SNAPSHOT_EVERY
    """Snapshot when the stream is this many events past its latest snapshot; 0: never."""
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    max_pending: int = DEFAULT_MAX_PENDING
    stats: SnapshotStats = field(default_factory=SnapshotStats)
    _in_flight: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False)
    _semaphore: asyncio.Semaphore | None = field(default=None, init=False)
    _closed: bool = field(default=False, init=False)
    _recent: dict[str, int] = field(default_factory=dict, init=False)
    _failures: OutageLog = field(default_factory=lambda: OutageLog(log, "snapshot writes"), init=False)
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
            self.stats.count("misses")
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
                self.stats.count("misses")
                return None  # not an error: an older revision was asked for
            state: S = _state_decoder(state_type).decode(data.state)
        except (ValueError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.ignored(stream, f"{exc}")
            return None
        self.stats.count("hits")
        return Snapshot(stream, data.revision, data.position), state

    def ignored(self, stream: str, why: str) -> None:
        self.stats.count("ignored")
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
            self.stats.count("skipped")  # the next append on the stream asks again
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
            except Exception as exc:
                self.stats.count("failed")
                if self._recent.get(pending.stream) == pending.revision:
                    del self._recent[pending.stream]  # let the next append try again
                where = f"snapshot of {pending.stream} at revision {pending.revision}"
                self._failures.failed(exc, detail=where, traceback=True)  # once per outage, not per write
            else:
                self._failures.succeeded()

    async def write(self, pending: PendingSnapshot[Any]) -> None:
        """Append the snapshot now (the background task's body; tests and tools may call it)."""
        data = SnapshotData(
            revision=pending.revision,
            position=pending.position,
            schema=pending.schema,
            state=msgspec.Raw(_encoder.encode(pending.state)),
        )
        scope = f"{pending.stream}\x1f{pending.revision}\x1f{pending.schema}"
        event = NewEvent(
            id=uuid.uuid5(SNAPSHOT_NAMESPACE, scope),
            type=SNAPSHOT_EVENT_TYPE,
            data=_encoder.encode(data),
            metadata=EventMetadata(actor="snapshotter", snapshot_of=pending.stream),
        )
        await self.event_store.append(snapshot_stream(pending.stream), [event], ANY)
        self.stats.count("written")

    async def drain(self) -> None:
        """Wait for every snapshot write in flight."""
        while self._in_flight:
            await asyncio.gather(*list(self._in_flight.values()), return_exceptions=True)

    async def close(self) -> None:
        """Start no more writes; wait for those in flight."""
        self._closed = True
        await self.drain()
