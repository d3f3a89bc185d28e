"""Command handling: load, evolve, decide, append with the expected revision.

One handler serves the HTTP API and the saga's activities alike.

Idempotency without a side table. With an idempotency key, the ids of the
events a command appends are derived from the key (``uuid5``), and the key and
a hash of the request travel in each event's metadata. Replaying the command
then finds its own events in the stream it has just loaded and answers with
their revision and position, after a restart too; two concurrent requests with
one key append the same ids at the same expected revision, which the event
store's idempotent append turns into one write.

Snapshots (:mod:`orderstream.application.snapshots`). With a
:class:`SnapshotStore`, a load starts from the stream's latest usable snapshot
and folds only the events after it; the snapshot carries the idempotency
records of the keyed commands before it (a bounded window), which a replay
consults beside the tail events. After an append that puts the stream
``every`` events past its latest snapshot, a new one is written in the
background; :meth:`CommandHandler.close` waits for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import msgspec

from orderstream.application.snapshots import (
    IdempotencyRecord,
    PendingSnapshot,
    Snapshot,
    SnapshotStore,
    state_schema_id,
)
from orderstream.domain.common import Decider, DomainError
from orderstream.events import EventRegistry
from orderstream.eventstore.base import (
    NO_STREAM,
    EventStore,
    Expected,
    NewEvent,
    RecordedEvent,
    WrongExpectedVersion,
)

S = TypeVar("S")
C = TypeVar("C")
E = TypeVar("E")

IDEMPOTENCY_NAMESPACE = uuid.UUID("4f1c8a52-3c0e-4f7e-9a55-0b8f3a7c2d11")
Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class IdempotencyKeyReused(DomainError):
    """The key was used before for a different request."""

    code = "idempotency-key-reused"

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"Idempotency-Key {key!r} was already used for a different request")


class ConcurrencyRetriesExhausted(Exception):
    """Without an expected revision the handler retried and still lost every race."""

    def __init__(self, stream: str, attempts: int) -> None:
        self.stream = stream
        self.attempts = attempts
        super().__init__(f"{stream}: still conflicting after {attempts} attempts")


@dataclass(frozen=True, kw_only=True)
class CommandContext:
    """Who asks and why; it becomes every appended event's metadata."""

    actor: str = "anonymous"
    correlation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    causation_id: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    """A digest of the request: a reused key with another request is refused."""

    def metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"actor": self.actor, "correlation_id": self.correlation_id}
        if self.causation_id:
            meta["causation_id"] = self.causation_id
        if self.idempotency_key:
            meta["idempotency_key"] = self.idempotency_key
        if self.request_hash:
            meta["request_hash"] = self.request_hash
        return meta


def request_digest(payload: object) -> str:
    return hashlib.sha256(msgspec.json.encode(payload, order="deterministic")).hexdigest()[:32]


def derived_event_id(context: CommandContext, stream: str, index: int) -> uuid.UUID:
    """The id of the ``index``-th event a keyed command appends to ``stream``.

    Scoped by actor (one client cannot replay, or pre-empt, another's key; the
    saga's step keys live apart from HTTP keys) and by the request's digest (two
    different requests racing with one key append different ids, so the store
    cannot mistake the second for a retry of the first)."""
    assert context.idempotency_key is not None
    scope = f"{context.actor}\x1f{context.idempotency_key}\x1f{context.request_hash or ''}"
    return uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"{scope}\x1f{stream}\x1f{index}")


@dataclass(frozen=True)
class Loaded(Generic[S]):
    state: S
    revision: int | None
    """``None``: the stream does not exist."""
    position: int | None
    """Commit position of the stream's last event."""
    events: Sequence[RecordedEvent]
    """The events folded: the whole stream, or those after ``snapshot``."""
    snapshot: Snapshot | None = None
    """The snapshot the fold started from, if any."""


@dataclass(frozen=True)
class CommandResult(Generic[S]):
    stream: str
    revision: int
    position: int
    state: S
    appended: Sequence[Any]
    """The domain events this call appended (empty for a no-op or a replayed key)."""
    replayed: bool = False
    """True when an idempotency key matched an earlier request."""


class CommandHandler:
    def __init__(
        self,
        event_store: EventStore,
        registry: EventRegistry,
        *,
        clock: Clock = utc_now,
        max_attempts: int = 8,
        on_conflict: Callable[[str], None] | None = None,
        retry_backoff: float = 0.002,
        snapshots: SnapshotStore | None = None,
    ) -> None:
        self.event_store = event_store
        self.snapshots = snapshots
        """``None`` (or ``every=0``): every load folds the whole stream."""
        self.registry = registry
        self.clock = clock
        self.max_attempts = max_attempts
        self._on_conflict = on_conflict
        self.retry_backoff = retry_backoff
        """Base of the jittered exponential back-off after a lost race (seconds).
        Without it every loser reloads at the same moment and only one of them
        can win each round, so a burst larger than ``max_attempts`` fails."""

    async def load(self, decider: Decider[C, E, S], stream: str, *, up_to: int | None = None) -> Loaded[S]:
        """Fold the stream (up to and including revision ``up_to``) into state,
        from its latest usable snapshot at or below ``up_to`` if there is one."""
        snapshots = self.snapshots
        if snapshots is not None and snapshots.enabled:
            initial = decider.initial_state()
            found = await snapshots.read(type(initial), stream, up_to=up_to)
            if found is not None:
                snapshot, state = found
                limit = None if up_to is None else up_to - snapshot.revision + 1
                # From the snapshot's own revision: its event must still be there, at
                # the snapshot's position, or the snapshot is not of this history.
                tail = await self.event_store.read_stream(
                    stream, from_revision=snapshot.revision, limit=limit
                )
                if tail and tail[0].revision == snapshot.revision and tail[0].position == snapshot.position:
                    events = tail[1:]
                    for event in events:
                        state = decider.evolve(state, self.registry.decode(event))
                    last = events[-1] if events else tail[0]
                    return Loaded(state, last.revision, last.position, events, snapshot)
                snapshots.ignored(
                    stream, f"no event at revision {snapshot.revision}, position {snapshot.position}"
                )
        limit = None if up_to is None else up_to + 1
        recorded = await self.event_store.read_stream(stream, limit=limit)
        state = decider.initial_state()
        for event in recorded:
            state = decider.evolve(state, self.registry.decode(event))
        if not recorded:
            return Loaded(state, None, None, recorded)
        return Loaded(state, recorded[-1].revision, recorded[-1].position, recorded)

    async def close(self) -> None:
        """Wait for the snapshot writes in flight (and start no more)."""
        if self.snapshots is not None:
            await self.snapshots.close()

    async def handle(
        self,
        decider: Decider[C, E, S],
        stream: str,
        command: C | Callable[[S], C],
        *,
        expected: int | None = None,
        context: CommandContext | None = None,
    ) -> CommandResult[S]:
        """Decide ``command`` on the stream's current state and append the result.

        ``command`` may be a function of the current state (for commands that
        need to read it first). With ``expected`` (the client's ``If-Match``)
        a stream at another revision raises :class:`WrongExpectedVersion`
        before deciding; without it a lost race is retried from a fresh load
        up to ``max_attempts`` times.
        """
        context = context or CommandContext()
        for attempt in range(self.max_attempts):
            loaded = await self.load(decider, stream)
            earlier = self._find_replay(loaded, stream, context)
            if earlier is not None:
                return earlier
            if expected is not None and loaded.revision != expected:
                raise WrongExpectedVersion(stream, expected, loaded.revision)
            cmd = command(loaded.state) if callable(command) else command
            try:
                events = list(decider.decide(cmd, loaded.state))
            except DomainError:
                # A key older than the snapshot's window may have answered before.
                if (earlier := await self._find_replay_before(loaded, stream, context)) is not None:
                    return earlier
                raise
            if not events:
                if (earlier := await self._find_replay_before(loaded, stream, context)) is not None:
                    return earlier
                if loaded.revision is None or loaded.position is None:
                    raise DomainError(f"{stream}: nothing to do on a stream that does not exist")
                return CommandResult(stream, loaded.revision, loaded.position, loaded.state, ())
            new_events = self._to_new_events(events, stream, context)
            expectation: Expected = NO_STREAM if loaded.revision is None else loaded.revision
            try:
                result = await self.event_store.append(stream, new_events, expectation)
            except WrongExpectedVersion as conflict:
                if conflict.actual == loaded.revision and context.idempotency_key:
                    # The stream did not move: the store refused the key's derived ids,
                    # stored earlier (before the snapshot's window of keys).
                    earlier = await self._find_replay_before(loaded, stream, context, certain=True)
                    if earlier is not None:
                        return earlier
                if expected is not None:
                    raise
                if self._on_conflict:
                    self._on_conflict(stream)
                if self.retry_backoff > 0:
                    await asyncio.sleep(random.uniform(0, min(self.retry_backoff * 2**attempt, 0.1)))
                continue
            state = loaded.state
            for event in events:
                state = decider.evolve(state, event)
            if self.snapshots is not None:
                self._snapshot_later(
                    decider, stream, loaded, state, result.revision, result.position, context
                )
            return CommandResult(stream, result.revision, result.position, state, events)
        raise ConcurrencyRetriesExhausted(stream, self.max_attempts)

    def _to_new_events(self, events: Sequence[Any], stream: str, context: CommandContext) -> list[NewEvent]:
        metadata = context.metadata()
        out = []
        for i, event in enumerate(events):
            event_id = derived_event_id(context, stream, i) if context.idempotency_key else uuid.uuid4()
            out.append(self.registry.to_new_event(event, event_id=event_id, metadata=metadata))
        return out

    def _snapshot_later(
        self,
        decider: Decider[C, E, S],
        stream: str,
        loaded: Loaded[S],
        state: S,
        revision: int,
        position: int,
        context: CommandContext,
    ) -> None:
        assert self.snapshots is not None
        appended = None
        if context.idempotency_key:
            appended = IdempotencyRecord(
                actor=context.actor,
                key=context.idempotency_key,
                request_hash=context.request_hash,
                revision=revision,
                position=position,
            )
        pending = PendingSnapshot(
            stream=stream,
            state=state,
            schema=state_schema_id(type(decider.initial_state())),
            revision=revision,
            position=position,
            base=loaded.snapshot,
            events=loaded.events,
            appended=appended,
        )
        self.snapshots.after_append(pending)

    async def _find_replay_before(
        self, loaded: Loaded[S], stream: str, context: CommandContext, *, certain: bool = False
    ) -> CommandResult[S] | None:
        """The earlier answer to this key among the events before the snapshot, when
        the snapshot's records may have forgotten it (its window dropped keys), or
        when the store said the key's events exist (``certain``). Reads those events'
        metadata: the slow path a full fold always took."""
        snapshot = loaded.snapshot
        key = context.idempotency_key
        if not key or snapshot is None or (snapshot.keys_complete and not certain):
            return None
        before = await self.event_store.read_stream(stream, limit=snapshot.revision + 1)
        return self._find_replay(
            Loaded(loaded.state, loaded.revision, loaded.position, before), stream, context
        )

    def _find_replay(
        self, loaded: Loaded[S], stream: str, context: CommandContext
    ) -> CommandResult[S] | None:
        """The earlier answer to this actor's key on this stream, if there is one.

        The same key with another request (a different digest) is refused: the
        first request's events are found by their metadata, not by id; those
        before the snapshot by the snapshot's idempotency records."""
        key = context.idempotency_key
        if not key:
            return None
        earlier = loaded.snapshot.lookup(context.actor, key) if loaded.snapshot is not None else None
        if earlier is not None and earlier.request_hash != context.request_hash:
            raise IdempotencyKeyReused(key)
        mine = []
        for event in loaded.events:
            meta = event.metadata_dict()
            if meta.get("idempotency_key") == key and meta.get("actor") == context.actor:
                mine.append((event, meta))
        if any(meta.get("request_hash") != context.request_hash for _, meta in mine):
            raise IdempotencyKeyReused(key)
        if mine:
            last = mine[-1][0]
            return CommandResult(stream, last.revision, last.position, loaded.state, (), replayed=True)
        if earlier is not None:
            return CommandResult(stream, earlier.revision, earlier.position, loaded.state, (), replayed=True)
        return None
