"""Command handling: load, evolve, decide, append with the expected revision.

One handler serves the HTTP API and the saga's activities alike.

Idempotency without a side table. With an idempotency key, the ids of the
events a command appends are derived from the key (``uuid5``), and the key and
a hash of the request travel in each event's metadata. Replaying the command
then finds its own events in the stream it has just loaded and answers with
their revision and position, after a restart too; two concurrent requests with
one key append the same ids at the same expected revision, which the event
store's idempotent append turns into one write.
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
    ) -> None:
        self.event_store = event_store
        self.registry = registry
        self.clock = clock
        self.max_attempts = max_attempts
        self._on_conflict = on_conflict
        self.retry_backoff = retry_backoff
        """Base of the jittered exponential back-off after a lost race (seconds).
        Without it every loser reloads at the same moment and only one of them
        can win each round, so a burst larger than ``max_attempts`` fails."""

    async def load(self, decider: Decider[C, E, S], stream: str, *, up_to: int | None = None) -> Loaded[S]:
        """Fold the stream (up to and including revision ``up_to``) into state."""
        limit = None if up_to is None else up_to + 1
        recorded = await self.event_store.read_stream(stream, limit=limit)
        state = decider.initial_state()
        for event in recorded:
            state = decider.evolve(state, self.registry.decode(event))
        if not recorded:
            return Loaded(state, None, None, recorded)
        return Loaded(state, recorded[-1].revision, recorded[-1].position, recorded)

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
            events = list(decider.decide(cmd, loaded.state))
            if not events:
                if loaded.revision is None or loaded.position is None:
                    raise DomainError(f"{stream}: nothing to do on a stream that does not exist")
                return CommandResult(stream, loaded.revision, loaded.position, loaded.state, ())
            new_events = self._to_new_events(events, stream, context)
            expectation: Expected = NO_STREAM if loaded.revision is None else loaded.revision
            try:
                result = await self.event_store.append(stream, new_events, expectation)
            except WrongExpectedVersion:
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
            return CommandResult(stream, result.revision, result.position, state, events)
        raise ConcurrencyRetriesExhausted(stream, self.max_attempts)

    def _to_new_events(self, events: Sequence[Any], stream: str, context: CommandContext) -> list[NewEvent]:
        metadata = context.metadata()
        out = []
        for i, event in enumerate(events):
            event_id = derived_event_id(context, stream, i) if context.idempotency_key else uuid.uuid4()
            out.append(self.registry.to_new_event(event, event_id=event_id, metadata=metadata))
        return out

    def _find_replay(
        self, loaded: Loaded[S], stream: str, context: CommandContext
    ) -> CommandResult[S] | None:
        """The earlier answer to this actor's key on this stream, if there is one.

        The same key with another request (a different digest) is refused: the
        first request's events are found by their metadata, not by id."""
        key = context.idempotency_key
        if not key or not loaded.events:
            return None
        mine = []
        for event in loaded.events:
            meta = event.metadata_dict()
            if meta.get("idempotency_key") == key and meta.get("actor") == context.actor:
                mine.append((event, meta))
        if not mine:
            return None
        if any(meta.get("request_hash") != context.request_hash for _, meta in mine):
            raise IdempotencyKeyReused(key)
        last = mine[-1][0]
        assert loaded.revision is not None
        return CommandResult(stream, last.revision, last.position, loaded.state, (), replayed=True)
