"""The event store port: what every backend (SQLite, KurrentDB) promises.

Vocabulary (one name per concept, used across the code base):

- *stream*: ``"{category}-{id}"``, e.g. ``order-7f3c...``. The category is the part
  before the first ``-``.
- *revision*: position of an event inside its stream, starting at 0.
- *position*: the global commit position. It orders every event in the store;
  it grows but need not be contiguous (KurrentDB positions are byte offsets).
- *expected*: what the writer believes the stream's revision is: an ``int``,
  or one of :class:`StreamState`.

The contract test suite in ``tests/contract/test_event_store.py`` is the
executable form of this page; a backend is correct when it passes it.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Protocol

import msgspec

from orderstream.application.errors import StorageFull


class StreamState(enum.Enum):
    """Expectations that are not a concrete revision."""

    NO_STREAM = "no_stream"
    """The stream must not exist yet."""
    STREAM_EXISTS = "stream_exists"
    """The stream must have at least one event."""
    ANY = "any"
    """No check."""


NO_STREAM = StreamState.NO_STREAM
STREAM_EXISTS = StreamState.STREAM_EXISTS
ANY = StreamState.ANY

Expected = int | StreamState


def category_of(stream: str) -> str:
    """``order-123`` -> ``order``."""
    return stream.split("-", 1)[0]


# --------------------------------------------------------------------------- errors


class EventStoreError(Exception):
    """Base class of the errors a backend raises."""


class WrongExpectedVersion(EventStoreError):
    """The stream is not at the expected revision. Nothing was written."""

    def __init__(self, stream: str, expected: Expected, actual: int | None) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual  # current revision, None when the stream does not exist
        shown = expected.value if isinstance(expected, StreamState) else expected
        super().__init__(f"{stream}: expected revision {shown}, actual {actual}")


class SubscriptionGroupNotFound(EventStoreError):
    def __init__(self, group: str) -> None:
        self.group = group
        super().__init__(f"persistent subscription group {group!r} does not exist")


class SubscriptionGroupExists(EventStoreError):
    def __init__(self, group: str) -> None:
        self.group = group
        super().__init__(f"persistent subscription group {group!r} already exists")


class EventStoreUnavailable(EventStoreError):
    """The backend cannot be reached (network, server down)."""


class EventStoreFull(EventStoreUnavailable, StorageFull):
    """The event store's disk is full: nothing was written; reads still work.

    An :class:`EventStoreUnavailable` (whoever retries outages retries this) and a
    :class:`~orderstream.application.errors.StorageFull` (the API answers 507)."""

    def __init__(self, cause: BaseException | None = None) -> None:
        StorageFull.__init__(self, "the event store", cause)


class IdempotencyKeyTaken(EventStoreError):
    """An append carried an idempotency record for an (actor, key, stream) that has
    one already (a concurrent request with the same key won). Nothing was written;
    the caller looks the record up again and answers from it."""

    def __init__(self, record: IdempotencyRecord) -> None:
        self.record = record
        super().__init__(f"{record.stream}: idempotency key {record.key!r} of {record.actor!r} is taken")


# --------------------------------------------------------------------------- events


class EventMetadata(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """Who wrote an event and why: every event's metadata, typed.

    Stored as a JSON object with these names (absent keys are ``None``), encoded once
    by the backend when the event is appended. Field order is the order on disk:
    what :class:`~orderstream.application.commands.CommandContext` writes encodes to
    the same bytes as the dicts written before this type existed.

    Decoding is lenient, because stored events never change: keys this type does not
    know (written by other tools, or by a newer version) are ignored, a known key
    holding something other than a string is dropped, and metadata that is not a
    JSON object reads as empty. They stay in the store untouched. KurrentDB's
    ``$schema_version`` key never reaches this type (the backend strips it into
    :attr:`RecordedEvent.schema_version`).
    """

    actor: str | None = None
    """The authenticated caller (``"anonymous"`` without auth), the saga, or ``"snapshotter"``."""
    correlation_id: str | None = None
    """The request's X-Correlation-ID; a saga's events carry its ``OrderPlaced``'s."""
    causation_id: str | None = None
    """The id of the event (or request) that caused this one."""
    idempotency_key: str | None = None
    request_hash: str | None = None
    """Digest of the keyed request: the same key with another request is refused."""
    snapshot_of: str | None = None
    """On a snapshot event: the stream it folds."""
    roles: str | None = None
    """The actor's roles when a request caused the event, space-separated (``"customer"``);
    absent on events written before roles existed and on the system's own."""
    traceparent: str | None = None
    """The span of the command that appended the event, as a W3C ``traceparent``
    (``00-<trace id>-<span id>-<flags>``): consumers continue its trace
    (:mod:`orderstream.tracing`). Absent when tracing is off and on events written
    before tracing existed. One standard field rather than ``trace_id``/``span_id``
    keys, which other tools write with meanings of their own (see the ``foreign``
    metadata fixture)."""

    def to_json(self) -> bytes:
        """The stored form (``b"{}"`` when every field is ``None``)."""
        return _metadata_encoder.encode(self)

    @classmethod
    def from_json(cls, stored: bytes) -> EventMetadata:
        """The stored form read back, leniently (see the class docstring)."""
        try:
            return _metadata_decoder.decode(stored) if stored else EMPTY_METADATA
        except (msgspec.DecodeError, msgspec.ValidationError):
            pass
        try:
            raw = msgspec.json.decode(stored)
        except msgspec.DecodeError:
            return EMPTY_METADATA
        if not isinstance(raw, dict):
            return EMPTY_METADATA
        return cls(**{k: v for k, v in raw.items() if k in cls.__struct_fields__ and isinstance(v, str)})


EMPTY_METADATA = EventMetadata()
_metadata_encoder = msgspec.json.Encoder()
_metadata_decoder = msgspec.json.Decoder(EventMetadata)


class NewEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event to append. ``data`` is JSON bytes; ``metadata`` is encoded by the
    backend when it appends.

    ``id`` makes appends idempotent: appending the same ids again with the same
    expectation succeeds without writing them twice.
    """

    id: uuid.UUID
    type: str
    data: bytes
    metadata: EventMetadata = EMPTY_METADATA
    schema_version: int = 1


class _MetadataCache:
    """A slot outside the Struct's fields: ``RecordedEvent`` caches its decoded
    metadata there without it counting in equality, hashing or encoding."""

    __slots__ = ("_metadata",)
    _metadata: EventMetadata


class RecordedEvent(msgspec.Struct, _MetadataCache, frozen=True, kw_only=True, gc=False):
    """An event as stored. ``recorded_at`` is timezone-aware UTC.

    ``metadata_json`` is the metadata exactly as stored, for the backends; code reads
    :attr:`metadata`, decoded on first use and kept. Not decoding it when the row
    is read keeps loads as fast as before: folding an aggregate never looks at
    metadata, and decoding it with every row added about 2 ms to a 10,000-event
    stream's 28 ms load (``bench.eventstore_append``'s stream, CPU time).
    """

    id: uuid.UUID
    stream: str
    revision: int
    position: int
    type: str
    schema_version: int
    data: bytes
    metadata_json: bytes
    recorded_at: datetime

    @property
    def category(self) -> str:
        return category_of(self.stream)

    @property
    def metadata(self) -> EventMetadata:
        decoded: EventMetadata | None = getattr(self, "_metadata", None)  # 2x cheaper than try/except
        if decoded is None:
            decoded = EventMetadata.from_json(self.metadata_json)
            msgspec.structs.force_setattr(self, "_metadata", decoded)
        return decoded


class IdempotencyClaim(msgspec.Struct, frozen=True, kw_only=True):
    """An idempotency record to store atomically with an append: the keyed command
    whose last event is ``events[last]`` of that append (a batch of commands carries
    one claim per keyed command)."""

    actor: str
    key: str
    request_hash: str | None
    last: int
    """Index, in the append's events, of the command's last event."""


class IdempotencyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What a keyed command appended: its last event's revision and position.

    Keys are scoped by actor and stream (the ids derived from a key are too), so a
    saga step that writes to two streams under one key keeps two records."""

    actor: str
    key: str
    stream: str
    request_hash: str | None
    revision: int
    position: int


class AppendResult(msgspec.Struct, frozen=True):
    """Revision and commit position of the last event of the append.

    For an idempotent re-append these describe the events already stored, and
    ``already_stored`` is true: nothing was written (a concurrent request with the
    same idempotency key wrote them first; its answer is a replay). SQLite always
    knows; KurrentDB knows only for appends with idempotency claims (its records
    were there already): the server answers a re-append of the same ids exactly as
    the first append, so without a key ``already_stored`` stays False there.
    """

    revision: int
    position: int
    already_stored: bool = False


class EventFilter(msgspec.Struct, frozen=True, kw_only=True):
    """Selects events from ``$all``. Empty tuples mean "everything"."""

    categories: tuple[str, ...] = ()
    types: tuple[str, ...] = ()

    def matches(self, stream: str, event_type: str) -> bool:
        if self.categories and category_of(stream) not in self.categories:
            return False
        return not (self.types and event_type not in self.types)


# ------------------------------------------------------------- persistent subscriptions


class NackAction(enum.Enum):
    RETRY = "retry"
    """Deliver again later; after ``max_retry`` deliveries it is parked."""
    PARK = "park"
    """Move to the parked list now; the group goes on."""
    SKIP = "skip"
    """Drop it; the group goes on as if it had been acknowledged."""


class SubscriptionSettings(msgspec.Struct, frozen=True, kw_only=True):
    filter: EventFilter = EventFilter()
    from_position: int | None = None
    """Start after this position; ``None`` starts from the beginning of ``$all``."""
    max_retry: int = 5
    """Deliveries of one event before it is parked."""
    ack_timeout_seconds: float = 30.0
    """An event delivered but neither acked nor nacked in this time is retried."""


class ParkedEvent(msgspec.Struct, frozen=True, kw_only=True):
    event: RecordedEvent
    reason: str
    attempts: int
    parked_at: datetime


class SkippedEvent(msgspec.Struct, frozen=True, kw_only=True):
    """A parked event an operator dropped for good: who, why, when."""

    event: RecordedEvent
    actor: str
    reason: str
    parked_reason: str
    attempts: int
    skipped_at: datetime


class ParkedEventNotFound(EventStoreError):
    def __init__(self, group: str, position: int) -> None:
        self.group = group
        self.position = position
        super().__init__(f"no parked event at position {position} in group {group!r}")


class GroupInfo(msgspec.Struct, frozen=True, kw_only=True):
    group: str
    checkpoint: int | None
    """Low-water mark: every matching event at or below it is acked, skipped or
    parked. ``None`` when nothing has been processed yet."""
    last_position: int | None
    """Position of the newest event in the store, for lag."""
    in_flight: int
    parked: int
    lag_events: int
    """Matching events after the checkpoint (may be approximate on KurrentDB)."""


class PersistentSubscription(Protocol):
    """One consumer's connection to a group. Events of one stream are delivered
    to one consumer at a time and in revision order."""

    def __aiter__(self) -> AsyncIterator[RecordedEvent]: ...

    async def ack(self, event: RecordedEvent) -> None: ...

    async def nack(self, event: RecordedEvent, action: NackAction, reason: str = "") -> None: ...

    async def keep_alive(self) -> None:
        """This consumer is alive and still working on what it was given: renew the
        lease of every event delivered to it and not yet settled, without counting a
        delivery. A consumer whose work may outlast ``ack_timeout_seconds`` (a read
        store outage) calls it more often than that; the ack timeout then only takes
        events away from consumers that died or stopped calling it. (KurrentDB cannot
        renew a message timeout: there it is a no-op.)"""
        ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- the port


class EventStore(Protocol):
    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        expected: Expected,
        *,
        idempotency: Sequence[IdempotencyClaim] = (),
    ) -> AppendResult:
        """Append atomically or raise :class:`WrongExpectedVersion` and write nothing.

        Each claim in ``idempotency`` becomes an :class:`IdempotencyRecord` with the
        revision and position of its command's last event (atomically with the events
        where the backend can; see each backend). A claim whose (actor, key, stream)
        has a record already raises :class:`IdempotencyKeyTaken`. An idempotent
        re-append (its event ids stored already) writes no record."""
        ...

    async def find_idempotency(self, actor: str, key: str, stream: str) -> IdempotencyRecord | None:
        """The record of this actor's key on ``stream``, in one read; ``None`` when the
        key was never used there."""
        ...

    async def find_idempotency_many(
        self, stream: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], IdempotencyRecord]:
        """The records of several (actor, key) pairs on ``stream`` (a batch of commands),
        in one read where the backend can; pairs never used there are absent."""
        ...

    async def read_stream(
        self,
        stream: str,
        *,
        from_revision: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        """Events of one stream (empty if it does not exist). Forwards from
        ``from_revision`` (default 0) or backwards from it (default: the end)."""
        ...

    async def stream_revision(self, stream: str) -> int | None:
        """Current revision, ``None`` if the stream does not exist."""
        ...

    async def read_all(
        self,
        *,
        after: int | None = None,
        filter: EventFilter | None = None,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        """Events of ``$all`` with position greater than ``after``, in position order."""
        ...

    async def head_position(self) -> int | None:
        """Position of the newest event, ``None`` for an empty store."""
        ...

    def subscribe(
        self, *, after: int | None = None, filter: EventFilter | None = None
    ) -> AsyncIterator[RecordedEvent]:
        """Catch-up subscription: everything after ``after``, then live events,
        until the consumer stops iterating."""
        ...

    async def create_subscription_group(self, group: str, settings: SubscriptionSettings) -> None:
        """Raises :class:`SubscriptionGroupExists`."""
        ...

    async def ensure_subscription_group(self, group: str, settings: SubscriptionSettings) -> None:
        """Create the group unless it exists."""
        ...

    async def delete_subscription_group(self, group: str) -> None: ...

    async def connect_subscription_group(
        self, group: str, *, prefetch: int | None = None
    ) -> PersistentSubscription:
        """Raises :class:`SubscriptionGroupNotFound`. ``prefetch``: how many events this
        consumer takes at a time (``None``: the store's default). A consumer that handles
        events in big batches (a projection) asks for more: a claim costs about the
        same whatever its size."""
        ...

    async def subscription_group_info(self, group: str) -> GroupInfo: ...

    async def list_parked(self, group: str, *, limit: int = 100) -> list[ParkedEvent]: ...

    async def replay_parked(self, group: str) -> int:
        """Deliver every parked event of the group again; returns how many."""
        ...

    async def skip_parked(self, group: str, position: int, *, actor: str, reason: str) -> SkippedEvent:
        """Drop the parked event at ``position`` for good (the group's consumers will
        never see it again), recording who did it and why. Raises
        :class:`ParkedEventNotFound` when no such event is parked in the group."""
        ...

    async def list_skipped(self, group: str, *, limit: int = 100) -> list[SkippedEvent]:
        """The events skipped in the group, oldest position first."""
        ...

    async def close(self) -> None: ...
