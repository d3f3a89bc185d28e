"""Command handling: load, replay check, check the expected revision, decide, append.

One handler serves the HTTP API and the saga's activities alike. The path of a
command is a straight line (:meth:`CommandHandler.handle_batch`)::

    load (snapshot + tail) -> replay check (one idempotency look-up per keyed command)
    -> check the expected revision -> decide -> append (with the idempotency records)

and a lost race (``WrongExpectedVersion`` without an ``If-Match``) redoes the line
from a fresh load, a bounded number of times with jittered exponential back-off
(tenacity). The core decides a *batch* of commands for one stream: each against
the state the ones before it left, a :class:`DomainError` failing only its own
command, and all their events go in ONE append. A single command is a batch of
one; :class:`~orderstream.application.stream_batcher.StreamBatcher` makes bigger
batches of a hot stream's concurrent commands.

Idempotency. A command with an idempotency key appends events whose ids are
derived from the key (``uuid5``), and its append carries an
:class:`~orderstream.eventstore.base.IdempotencyClaim`: the store keeps the
record (actor, key, stream -> request hash, revision, position) atomically with
the events (SQLite: the same transaction; KurrentDB: see docs/command-path.md).
A replay looks the record up and answers with the first request's revision and
position; the same key with another request is refused
(:class:`IdempotencyKeyReused`). Two concurrent requests with one key append
the same ids at the same expected revision, which the store's idempotent append
turns into one write. When the store refuses a key's derived ids although no
record was found (a KurrentDB append whose record was lost to a crash), the
stream's events are searched by their metadata: the slow path, taken only then.

Metrics are a wrapper (:class:`orderstream.metrics.MeteredCommandHandler`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Protocol, TypeVar

import msgspec
from opentelemetry.trace import Span
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from orderstream import tracing
from orderstream.application.ids import uuid5
from orderstream.application.snapshots import PendingSnapshot, Snapshot, SnapshotStore, state_schema_id
from orderstream.domain.common import Decider, DomainError
from orderstream.events import EventRegistry
from orderstream.eventstore.base import (
    NO_STREAM,
    AppendResult,
    EventMetadata,
    EventStore,
    IdempotencyClaim,
    IdempotencyKeyTaken,
    IdempotencyRecord,
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


class _DerivedIdsStored(Exception):
    """The store refused a keyed command's derived ids with no record to explain it:
    retry with the slow metadata search on."""


@dataclass(frozen=True, kw_only=True)
class CommandContext:
    """Who asks and why; it becomes every appended event's metadata."""

    actor: str = "anonymous"
    roles: str | None = None
    """The actor's roles, space-separated (requests); ``None`` for the system's own commands."""
    correlation_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    causation_id: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None
    """A digest of the request: a reused key with another request is refused."""
    traceparent: str | None = None
    """The command's span as a W3C ``traceparent`` when tracing is on (the handler
    sets it): written into the events' metadata for the consumers to continue."""

    def metadata(self) -> EventMetadata:
        return EventMetadata(
            actor=self.actor,
            roles=self.roles,
            correlation_id=self.correlation_id,
            causation_id=self.causation_id or None,
            idempotency_key=self.idempotency_key or None,
            request_hash=self.request_hash or None,
            traceparent=self.traceparent,
        )

    def traced(self, span: Span) -> CommandContext:
        """This context under ``span`` (itself while tracing is off)."""
        traceparent = tracing.traceparent_of(span)
        return self if traceparent is None else dataclasses.replace(self, traceparent=traceparent)


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
    return uuid5(IDEMPOTENCY_NAMESPACE, f"{scope}\x1f{stream}\x1f{index}")


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
    """Commit position of the append that wrote the command's events (the last
    event of that append: a batch shares one), or of the replayed command's."""
    state: S
    appended: Sequence[Any]
    """The domain events this call appended (empty for a no-op or a replayed key)."""
    replayed: bool = False
    """True when an idempotency key matched an earlier request."""


@dataclass(frozen=True)
class Request(Generic[C, S]):
    """One command of a batch, with its context."""

    command: C | Callable[[S], C]
    """The command, or a function of the current state that builds it."""
    context: CommandContext = field(default_factory=CommandContext)


Outcome = CommandResult[S] | DomainError
"""What one command of a batch came to: its result or the business rule it broke."""


class Commands(Protocol):
    """What the use cases need of a command handler (the handler or its metered wrapper)."""

    clock: Clock

    async def load(
        self, decider: Decider[C, E, S], stream: str, *, up_to: int | None = None
    ) -> Loaded[S]: ...

    async def handle(
        self,
        decider: Decider[C, E, S],
        stream: str,
        command: C | Callable[[S], C],
        *,
        expected: int | None = None,
        context: CommandContext | None = None,
    ) -> CommandResult[S]: ...

    async def handle_batch(
        self, decider: Decider[C, E, S], stream: str, requests: Sequence[Request[C, S]]
    ) -> list[Outcome[S]]: ...

    async def create(
        self, decider: Decider[C, E, S], stream: str, command: C, *, context: CommandContext | None = None
    ) -> CommandResult[S]: ...

    async def find_idempotency(self, actor: str, key: str, stream: str) -> IdempotencyRecord | None:
        """The record of ``actor``'s command with idempotency ``key`` on ``stream``, if
        one was handled there (``None`` otherwise)."""
        ...

    async def close(self) -> None: ...


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

    async def find_idempotency(self, actor: str, key: str, stream: str) -> IdempotencyRecord | None:
        """By its record, else by its events' metadata: a record written apart from its
        events (KurrentDB's ``idempotency-…`` stream) is missing after a crash between
        the two writes, while the events carry the key."""
        record = await self.event_store.find_idempotency(actor, key, stream)
        return record if record is not None else await self._record_from_metadata(stream, actor, key)

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

    # ------------------------------------------------------------------ the path

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
        with tracing.command_span("command", stream) as span:
            request: Request[C, S] = Request(command, (context or CommandContext()).traced(span))
            (outcome,) = await self._with_retry(decider, stream, [request], expected)
            if isinstance(outcome, DomainError):
                span.set_attribute("orderstream.refused", outcome.code)
                raise outcome
            _note_appended(span, outcome)
            return outcome

    async def handle_batch(
        self, decider: Decider[C, E, S], stream: str, requests: Sequence[Request[C, S]]
    ) -> list[Outcome[S]]:
        """Decide every request in order against the evolving state and append all
        their events in one append; one outcome per request, in order.

        Traced as one span (the batch runs in the batcher's task, under the context of
        the request that started it), whose ids go into every request's events."""
        with tracing.command_span("command batch", stream) as span:
            if span.get_span_context().is_valid:  # tracing is on
                span.set_attribute("orderstream.requests", len(requests))
                requests = [dataclasses.replace(r, context=r.context.traced(span)) for r in requests]
            return await self._with_retry(decider, stream, requests, None)

    async def create(
        self, decider: Decider[C, E, S], stream: str, command: C, *, context: CommandContext | None = None
    ) -> CommandResult[S]:
        """A command that starts a stream no one else can know yet (a new random or
        key-derived order id): decided on the initial state and appended with
        ``NO_STREAM``, without reading the stream or looking the key up first. If it
        exists after all, the append says so: a retry of the same keyed request appends
        the same derived ids, which the store recognises (``already_stored``: a replay);
        anything else conflicts and the ordinary path answers (the key's record: a replay
        or :class:`IdempotencyKeyReused`; else the decider's refusal)."""
        with tracing.command_span("command", stream) as span:
            result = await self._create(decider, stream, command, (context or CommandContext()).traced(span))
            _note_appended(span, result)
            return result

    async def _create(
        self, decider: Decider[C, E, S], stream: str, command: C, context: CommandContext
    ) -> CommandResult[S]:
        # No look-up of the key first (issue 7: one read per keyed POST): see the docstring.
        state = decider.initial_state()
        events = list(decider.decide(command, state))
        if not events:
            raise DomainError(f"{stream}: nothing to do on a stream that does not exist")
        claims = [_claim(context, len(events) - 1)] if context.idempotency_key else []
        try:
            with tracing.command_span("append", stream):
                result = await self.event_store.append(
                    stream, self._to_new_events(events, stream, context), NO_STREAM, idempotency=claims
                )
        except (WrongExpectedVersion, IdempotencyKeyTaken):
            return await self.handle(decider, stream, command, context=context)
        for event in events:
            state = decider.evolve(state, event)
        self._snapshot_later(decider, stream, None, state, result.revision, result.position)
        if result.already_stored:  # a concurrent request with this key wrote them first
            return CommandResult(stream, result.revision, result.position, state, (), replayed=True)
        return CommandResult(stream, result.revision, result.position, state, events)

    async def _with_retry(
        self,
        decider: Decider[C, E, S],
        stream: str,
        requests: Sequence[Request[C, S]],
        expected: int | None,
    ) -> list[Outcome[S]]:
        retried: tuple[type[BaseException], ...] = (IdempotencyKeyTaken, _DerivedIdsStored)
        if expected is None:
            retried += (WrongExpectedVersion,)
        search_metadata = False

        def lost_race(state: RetryCallState) -> None:
            nonlocal search_metadata
            failure = state.outcome.exception() if state.outcome is not None else None
            search_metadata = search_metadata or isinstance(failure, _DerivedIdsStored)
            if isinstance(failure, WrongExpectedVersion) and self._on_conflict is not None:
                self._on_conflict(stream)

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(retried),
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_random_exponential(multiplier=self.retry_backoff, max=0.1),
            before_sleep=lost_race,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await self._once(decider, stream, requests, expected, search_metadata)
        except (WrongExpectedVersion, _DerivedIdsStored, IdempotencyKeyTaken) as conflict:
            if expected is not None and isinstance(conflict, WrongExpectedVersion):
                raise
            raise ConcurrencyRetriesExhausted(stream, self.max_attempts) from conflict
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover

    async def _once(
        self,
        decider: Decider[C, E, S],
        stream: str,
        requests: Sequence[Request[C, S]],
        expected: int | None,
        search_metadata: bool,
    ) -> list[Outcome[S]]:
        """One attempt: load -> replay checks -> expected revision -> decide -> append."""
        loaded = await self.load(decider, stream)
        earlier = await self._replays(loaded, stream, requests, search_metadata)
        if expected is not None and loaded.revision != expected and not all(earlier):
            raise WrongExpectedVersion(stream, expected, loaded.revision)
        batch = _Batch(stream, loaded, earlier)
        for request in requests:
            batch.decide(decider, request, self._to_new_events)
        if not batch.new_events:
            return batch.answers(None)
        expectation = NO_STREAM if loaded.revision is None else loaded.revision
        try:
            with tracing.command_span("append", stream):
                result = await self.event_store.append(
                    stream, batch.new_events, expectation, idempotency=batch.claims
                )
        except WrongExpectedVersion as conflict:
            if batch.claims and conflict.actual == loaded.revision and not search_metadata:
                raise _DerivedIdsStored from conflict  # the stream did not move: our ids are stored
            raise
        self._snapshot_later(decider, stream, loaded.snapshot, batch.state, result.revision, result.position)
        answers = batch.answers(result)
        if result.already_stored:  # a concurrent request with these keys wrote them first
            return [
                dataclasses.replace(a, appended=(), replayed=True) if isinstance(a, CommandResult) else a
                for a in answers
            ]
        return answers

    # ------------------------------------------------------------------ pieces

    async def _replays(
        self, loaded: Loaded[S], stream: str, requests: Sequence[Request[C, S]], search_metadata: bool
    ) -> list[Outcome[S] | None]:
        """Per request, the earlier answer to its key on this stream (one look-up for the
        whole batch; with ``search_metadata`` also the slow search of the events), or
        :class:`IdempotencyKeyReused` when the key answered another request."""
        keys = [(r.context.actor, r.context.idempotency_key or "") for r in requests]
        keyed = [pair for pair in keys if pair[1]]
        if not keyed:
            return [None] * len(requests)
        if len(keyed) == 1:
            ((actor, key),) = keyed
            record = await self.event_store.find_idempotency(actor, key, stream)
            records = {} if record is None else {(actor, key): record}
        else:
            records = await self.event_store.find_idempotency_many(stream, keyed)
        answers: list[Outcome[S] | None] = []
        for request, (actor, key) in zip(requests, keys, strict=True):
            context = request.context
            record = records.get((actor, key)) if key else None
            if key and record is None and search_metadata:
                record = await self._record_from_metadata(stream, actor, key)
            if record is None:
                answers.append(None)
                continue
            try:
                answers.append(self._replayed(record, context, stream, loaded.state))
            except IdempotencyKeyReused as refused:
                answers.append(refused)
        return answers

    @staticmethod
    def _replayed(
        record: IdempotencyRecord, context: CommandContext, stream: str, state: S
    ) -> CommandResult[S]:
        if record.request_hash != context.request_hash:
            raise IdempotencyKeyReused(record.key)
        return CommandResult(stream, record.revision, record.position, state, (), replayed=True)

    async def _record_from_metadata(self, stream: str, actor: str, key: str) -> IdempotencyRecord | None:
        """The slow path: the key's last event in the stream, found by its metadata."""
        found: IdempotencyRecord | None = None
        hashes: set[str | None] = set()
        for event in await self.event_store.read_stream(stream):
            meta = event.metadata
            if meta.idempotency_key == key and meta.actor == actor:
                hashes.add(meta.request_hash)
                found = IdempotencyRecord(
                    actor=actor,
                    key=key,
                    stream=stream,
                    request_hash=meta.request_hash,
                    revision=event.revision,
                    position=event.position,
                )
        if found is not None and len(hashes) > 1:
            found = msgspec.structs.replace(found, request_hash="!mixed")  # matches no request
        return found

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
        base: Snapshot | None,
        state: S,
        revision: int,
        position: int,
    ) -> None:
        if self.snapshots is None:
            return
        pending = PendingSnapshot(
            stream=stream,
            state=state,
            schema=state_schema_id(type(decider.initial_state())),
            revision=revision,
            position=position,
            base=base,
        )
        self.snapshots.after_append(pending)


def _note_appended(span: Span, result: CommandResult[Any]) -> None:
    """The event types a command appended, on its span (what a trace viewer shows)."""
    if span.is_recording():
        span.set_attribute("orderstream.appended", [type(event).__name__ for event in result.appended])
        span.set_attribute("orderstream.revision", result.revision)


def _claim(context: CommandContext, last: int) -> IdempotencyClaim:
    assert context.idempotency_key is not None
    return IdempotencyClaim(
        actor=context.actor, key=context.idempotency_key, request_hash=context.request_hash, last=last
    )


class _Batch(Generic[S]):
    """The decisions of one attempt at a batch: the state evolving through them, the
    events and idempotency claims of the one append, and each request's outcome."""

    def __init__(self, stream: str, loaded: Loaded[S], earlier: list[Outcome[S] | None]) -> None:
        self.stream = stream
        self.loaded = loaded
        self.state = loaded.state
        self.outcomes = list(earlier)
        """Per request: replayed or refused already, or (after :meth:`answers`) its result."""
        self.new_events: list[NewEvent] = []
        self.claims: list[IdempotencyClaim] = []
        self._decided: list[tuple[int, Sequence[Any], S]] = []  # (request, its events, state after)
        self._first_with_key: dict[tuple[str, str], int] = {}
        self._repeats: dict[int, int] = {}  # a request -> the earlier one of the batch with its key
        self._requests: list[Request[Any, S]] = []

    def decide(
        self,
        decider: Decider[C, E, S],
        request: Request[C, S],
        to_new_events: Callable[[Sequence[Any], str, CommandContext], list[NewEvent]],
    ) -> None:
        """Decide the next request against the state so far (unless it was answered)."""
        index = len(self._requests)
        self._requests.append(request)
        if self.outcomes[index] is not None or self._repeated(request.context, index):
            return
        try:
            command = request.command(self.state) if callable(request.command) else request.command
            events = decider.decide(command, self.state)
        except DomainError as refused:
            self.outcomes[index] = refused
            return
        for event in events:
            self.state = decider.evolve(self.state, event)
        self.new_events += to_new_events(events, self.stream, request.context)
        if events and request.context.idempotency_key:
            self.claims.append(_claim(request.context, len(self.new_events) - 1))
        self._decided.append((index, events, self.state))

    def _repeated(self, context: CommandContext, index: int) -> bool:
        """A key seen earlier in this batch: the same request gets that one's answer (a
        concurrent duplicate), another request is refused (as one append later)."""
        if not context.idempotency_key:
            return False
        earlier = self._first_with_key.setdefault((context.actor, context.idempotency_key), index)
        if earlier == index:
            return False
        if self._requests[earlier].context.request_hash != context.request_hash:
            self.outcomes[index] = IdempotencyKeyReused(context.idempotency_key)
        else:
            self._repeats[index] = earlier
        return True

    def answers(self, appended: AppendResult | None) -> list[Outcome[S]]:
        """Every request's outcome, once the batch's events are ``appended`` (``None``:
        the batch decided no events)."""
        loaded = self.loaded
        first = 0 if appended is None else appended.revision - len(self.new_events) + 1
        written = 0
        for index, events, after in self._decided:
            written += len(events)
            revision = loaded.revision if appended is None else first + written - 1
            position = loaded.position if appended is None else appended.position
            if revision is None or position is None or revision < 0:
                self.outcomes[index] = DomainError(
                    f"{self.stream}: nothing to do on a stream that does not exist"
                )
            else:
                self.outcomes[index] = CommandResult(self.stream, revision, position, after, events)
        for index, earlier in self._repeats.items():
            answer = self.outcomes[earlier]
            if isinstance(answer, CommandResult):
                answer = dataclasses.replace(answer, appended=(), replayed=True)
            self.outcomes[index] = answer
        return [outcome for outcome in self.outcomes if outcome is not None]
