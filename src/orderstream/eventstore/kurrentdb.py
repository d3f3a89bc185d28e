"""KurrentDB / EventStoreDB backend of the event-store port, on ``kurrentdbclient``.

``await KurrentDBEventStore.open("kurrentdb://localhost:2113?tls=false")``. The
mapping decisions (expectations, positions, schema version in metadata, filters,
the Pinned consumer strategy, checkpoints, parked events) are in ``docs/kurrentdb.md``;
the pure parts live in :mod:`orderstream.eventstore.kurrentdb_mapping`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Final

import msgspec
from kurrentdbclient import AsyncKurrentDBClient
from kurrentdbclient import NewEvent as KdbNewEvent
from kurrentdbclient import RecordedEvent as KdbRecordedEvent
from kurrentdbclient import StreamState as KdbStreamState
from kurrentdbclient.exceptions import (
    AlreadyExistsError,
    DeadlineExceededError,
    DiscoveryFailedError,
    KurrentDBClientError,
    NodeIsNotLeaderError,
    NotFoundError,
    ProgrammingError,
    ServiceUnavailableError,
    WrongCurrentVersionError,
)

from orderstream.eventstore.base import (
    NO_STREAM,
    AppendResult,
    EventFilter,
    EventStoreError,
    EventStoreUnavailable,
    Expected,
    GroupInfo,
    IdempotencyClaim,
    IdempotencyKeyTaken,
    IdempotencyRecord,
    NewEvent,
    ParkedEvent,
    RecordedEvent,
    SkippedEvent,
    SubscriptionGroupExists,
    SubscriptionGroupNotFound,
    SubscriptionSettings,
    WrongExpectedVersion,
)
from orderstream.eventstore.kurrentdb_consumer import KurrentDBPersistentSubscription, to_recorded
from orderstream.eventstore.kurrentdb_mapping import (
    CONSUMER_STRATEGY,
    GroupRecord,
    ParkNote,
    Unknown,
    actual_from_client,
    encode_metadata,
    expectation_met,
    notes_stream,
    parked_stream,
    parse_all_position,
    parse_parked_link_metadata,
    revision_after_append,
    server_filter,
    server_max_retry_count,
    settings_stream,
    to_client_expected,
    validate_uri,
    wanted,
)

if TYPE_CHECKING:
    from kurrentdbclient.common import AbstractAsyncPersistentSubscription
    from kurrentdbclient.persistent import SubscriptionInfo

    from orderstream.eventstore.base import EventStore, PersistentSubscription
    from orderstream.eventstore.kurrentdb_consumer import ConsumerBackend

log = logging.getLogger(__name__)

TEST_IMAGE: Final = "docker.kurrent.io/kurrent-latest/kurrentdb:25.1"

# Checkpoint about once a second when anything was processed, at the latest every 100
# events (server defaults: 10 events / 2 s / 1000 events).
MIN_CHECKPOINT_COUNT: Final = 1
MAX_CHECKPOINT_COUNT: Final = 100
CHECKPOINT_AFTER: Final = 1.0

_UNAVAILABLE = (ServiceUnavailableError, DiscoveryFailedError, DeadlineExceededError, NodeIsNotLeaderError)


@contextlib.contextmanager
def _client_errors() -> Iterator[None]:
    """Client exceptions that no caller handles -> the port's errors."""
    try:
        yield
    except EventStoreError:
        raise
    except _UNAVAILABLE as exc:
        raise EventStoreUnavailable(f"KurrentDB unavailable: {type(exc).__name__}: {exc}") from exc
    except (KurrentDBClientError, ProgrammingError) as exc:
        raise EventStoreError(f"KurrentDB error: {type(exc).__name__}: {exc}") from exc


class KurrentDBEventStore:
    """The :class:`~orderstream.eventstore.base.EventStore` port on KurrentDB."""

    def __init__(
        self,
        client: AsyncKurrentDBClient,
        *,
        operation_timeout: float = 30.0,
        lag_count_limit: int = 10_000,
        consumer_buffer_size: int = 10,
    ) -> None:
        self._client = client
        self._timeout = operation_timeout
        self._lag_count_limit = lag_count_limit
        self._consumer_buffer_size = consumer_buffer_size

    @classmethod
    async def open(cls, uri: str, *, connect_timeout: float = 10.0) -> KurrentDBEventStore:
        """Connect (``kurrentdb://``, ``kurrentdb+discover://``, ``esdb://``, ...) and check
        that the server answers. Raises :class:`ValueError` for a bad URI and
        :class:`EventStoreUnavailable` when the server cannot be reached."""
        validate_uri(uri)
        client = AsyncKurrentDBClient(uri)
        store = cls(client)
        try:
            await asyncio.wait_for(store.head_position(), connect_timeout)
        except TimeoutError as exc:
            await store.close()
            raise EventStoreUnavailable(f"KurrentDB at {uri} did not answer in {connect_timeout}s") from exc
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        with contextlib.suppress(ProgrammingError, AttributeError):
            await self._client.close()  # ProgrammingError: never connected

    # ----------------------------------------------------------------------- writing

    async def append(
        self,
        stream: str,
        events: Sequence[NewEvent],
        expected: Expected,
        *,
        idempotency: Sequence[IdempotencyClaim] = (),
    ) -> AppendResult:
        """See the port. Idempotency records are NOT atomic with the events here: each
        one is appended after them to its own ``idempotency-{digest}`` stream with
        ``NO_STREAM`` (docs/command-path.md). A crash in between leaves events whose
        ids were derived from the key and no record: the command handler's replay of
        that key then finds the events by their ids and metadata (the slow path)."""
        for claim in idempotency:
            if not 0 <= claim.last < len(events):
                raise ValueError(f"{stream}: idempotency claim for event {claim.last} of {len(events)}")
        if idempotency and events and isinstance(expected, int) and not isinstance(expected, bool):
            await self._refuse_ids_stored_earlier(stream, events, expected)
        result = await self._append_events(stream, events, expected)
        recorded_before = [
            await self._record_idempotency(stream, claim, result, len(events)) for claim in idempotency
        ]
        if recorded_before and all(recorded_before):
            # The server took the same ids at the same expectation as a no-op, and our
            # records were there already: a concurrent request with these keys wrote
            # them first. (Without a key KurrentDB does not say whether an append was
            # a re-append: ``already_stored`` stays False; docs/kurrentdb.md.)
            result = msgspec.structs.replace(result, already_stored=True)
        return result

    async def _refuse_ids_stored_earlier(
        self, stream: str, events: Sequence[NewEvent], expected: int
    ) -> None:
        """KurrentDB deduplicates event ids only at the expectation they were first
        appended with; at a newer revision it stores them again. A keyed command's ids
        are derived from its key, so finding them at or below ``expected`` means an
        earlier run appended them and lost its record (a crash in between): refuse, as
        SQLite does, with the stream's revision as ``actual``, and the command handler
        answers from the stored events instead of applying the command twice
        (docs/command-path.md). One backwards read: ids older than the stream's last
        100 events are not seen."""
        ids = {e.id for e in events}
        current: int | None = None
        with _client_errors():
            async for raw in self._stream_backwards(stream, max_events=100):
                current = raw.stream_position if current is None else current
                if raw.id in ids and raw.stream_position <= expected:
                    raise WrongExpectedVersion(stream, expected, current)

    async def find_idempotency(self, actor: str, key: str, stream: str) -> IdempotencyRecord | None:
        found = await self.read_stream(idempotency_stream(actor, key, stream), limit=1)
        return _record_decoder.decode(found[0].data) if found else None

    async def find_idempotency_many(
        self, stream: str, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], IdempotencyRecord]:
        """One read per key (one stream each), run concurrently."""
        wanted = list(dict.fromkeys(keys))
        records = await asyncio.gather(*(self.find_idempotency(actor, key, stream) for actor, key in wanted))
        return {pair: record for pair, record in zip(wanted, records, strict=True) if record is not None}

    async def _record_idempotency(
        self, stream: str, claim: IdempotencyClaim, result: AppendResult, count: int
    ) -> bool:
        """Append the claim's record; True when the same record was there already."""
        revision = result.revision - (count - 1 - claim.last)
        position = result.position
        if revision != result.revision:  # not the append's last event: look its position up
            position = (await self.read_stream(stream, from_revision=revision, limit=1))[0].position
        record = IdempotencyRecord(
            actor=claim.actor,
            key=claim.key,
            stream=stream,
            request_hash=claim.request_hash,
            revision=revision,
            position=position,
        )
        data = msgspec.json.encode(record)
        side = idempotency_stream(claim.actor, claim.key, stream)
        event = NewEvent(
            # A fresh id: a second append of a record is then always refused (NO_STREAM),
            # never taken by the server as an idempotent no-op, so we learn that the
            # record was there already (a concurrent request with this key was first).
            id=uuid.uuid4(),
            type="IdempotencyRecord",
            data=data,
        )
        try:
            await self._append_events(side, [event], NO_STREAM)
        except WrongExpectedVersion:
            taken = await self.find_idempotency(claim.actor, claim.key, stream)
            if taken is not None and taken != record:
                raise IdempotencyKeyTaken(taken) from None
            return True
        return False

    async def _append_events(
        self, stream: str, events: Sequence[NewEvent], expected: Expected
    ) -> AppendResult:
        current_version = to_client_expected(expected)
        if not events:
            return await self._check_expectation(stream, expected)
        new_events = [
            KdbNewEvent(
                id=e.id,
                type=e.type,
                data=e.data,
                metadata=encode_metadata(e.metadata.to_json(), e.schema_version),
                content_type="application/json",
            )
            for e in events
        ]
        with _client_errors():
            try:
                position = await self._client.append_to_stream(
                    stream, events=new_events, current_version=current_version, timeout=self._timeout
                )
            except WrongCurrentVersionError as exc:
                raise await self._wrong_version(stream, expected, exc) from exc
        revision = revision_after_append(expected, len(events))
        # For an idempotent re-append the server answers "success, no position" and the
        # client turns that into 0; a real event is never at position 0 (the log starts
        # with system records). Then, and for ANY / STREAM_EXISTS, look the event up.
        if revision is not None and position > 0:
            return AppendResult(revision, position)
        found = await self._locate(stream, events[-1].id, revision)
        return msgspec.structs.replace(found, already_stored=True) if position == 0 else found

    async def _check_expectation(self, stream: str, expected: Expected) -> AppendResult:
        """An empty append: check the expectation against the stream's last event and
        return its revision and position (``(-1, -1)`` for a missing stream)."""
        with _client_errors():
            try:
                last = await self._client.get_stream(stream, backwards=True, limit=1)
            except NotFoundError:
                last = ()
        revision = last[0].stream_position if last else None
        if not expectation_met(expected, revision):
            raise WrongExpectedVersion(stream, expected, revision)
        return (
            AppendResult(last[0].stream_position, last[0].commit_position) if last else AppendResult(-1, -1)
        )

    async def _wrong_version(
        self, stream: str, expected: Expected, exc: WrongCurrentVersionError
    ) -> WrongExpectedVersion:
        actual = actual_from_client(exc.actual_version)
        if isinstance(actual, Unknown):
            return WrongExpectedVersion(stream, expected, await self.stream_revision(stream))
        return WrongExpectedVersion(stream, expected, actual)

    async def _locate(self, stream: str, event_id: uuid.UUID, revision: int | None) -> AppendResult:
        """Revision and position of an event just appended (or found already there)."""
        with _client_errors():
            if revision is not None:
                found = await self._client.get_stream(stream, stream_position=revision, limit=1)
                if found and found[0].id == event_id:
                    return AppendResult(found[0].stream_position, found[0].commit_position)
            # Newest first: the event is at or near the end unless others appended since.
            async for raw in self._stream_backwards(stream, max_events=1_000):
                if raw.id == event_id:
                    return AppendResult(raw.stream_position, raw.commit_position)
        raise EventStoreError(
            f"{stream}: appended event {event_id} not found in the stream's last 1000 events"
        )

    async def _stream_backwards(self, stream: str, *, max_events: int) -> AsyncIterator[KdbRecordedEvent]:
        try:
            batch = await self._client.get_stream(stream, backwards=True, limit=min(100, max_events))
        except NotFoundError:
            return
        seen = 0
        while batch:
            for raw in batch:
                yield raw
            seen += len(batch)
            if seen >= max_events or batch[-1].stream_position == 0:
                return
            batch = await self._client.get_stream(
                stream,
                stream_position=batch[-1].stream_position - 1,
                backwards=True,
                limit=min(100, max_events - seen),
            )

    # ----------------------------------------------------------------------- reading

    async def read_stream(
        self,
        stream: str,
        *,
        from_revision: int | None = None,
        backwards: bool = False,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        if limit is not None and limit <= 0:
            return []
        with _client_errors():
            try:
                raws = await self._client.get_stream(
                    stream,
                    stream_position=from_revision,
                    backwards=backwards,
                    limit=sys.maxsize if limit is None else limit,
                )
            except NotFoundError:
                return []
        return [to_recorded(raw) for raw in raws]

    async def stream_revision(self, stream: str) -> int | None:
        with _client_errors():
            current = await self._client.get_current_version(stream)
        return current if isinstance(current, int) else None

    async def read_all(
        self,
        *,
        after: int | None = None,
        filter: EventFilter | None = None,
        limit: int | None = None,
    ) -> list[RecordedEvent]:
        if limit is not None and limit <= 0:
            return []
        plan = server_filter(filter)
        # Reading $all from a position includes the event at that position: ask for one
        # more and drop it. With a client-side half of the filter, read until enough.
        server_limit = sys.maxsize if limit is None or plan.client_types else limit + 1
        out: list[RecordedEvent] = []
        with _client_errors():
            response = await self._client.read_all(commit_position=after, limit=server_limit, **plan.kwargs())
            async with response:
                async for raw in response:
                    if after is not None and raw.commit_position <= after:
                        continue
                    if not wanted(filter, raw.stream_name, raw.type):
                        continue
                    out.append(to_recorded(raw))
                    if limit is not None and len(out) >= limit:
                        break
        return out

    async def head_position(self) -> int | None:
        plan = server_filter(None)
        with _client_errors():
            response = await self._client.read_all(backwards=True, limit=1, **plan.kwargs())
            async with response:
                async for raw in response:
                    return raw.commit_position
        return None

    async def subscribe(
        self, *, after: int | None = None, filter: EventFilter | None = None
    ) -> AsyncIterator[RecordedEvent]:
        """Catch-up subscription to ``$all``: the server starts *after* ``commit_position``
        and sends checkpoints, which the client drops (``include_checkpoints=False``)."""
        plan = server_filter(filter)
        with _client_errors():
            subscription = await self._client.subscribe_to_all(commit_position=after, **plan.kwargs())
        try:
            with _client_errors():
                async for raw in subscription:
                    if raw.is_checkpoint or raw.is_caught_up or raw.is_fell_behind:
                        continue
                    if after is not None and raw.commit_position <= after:
                        continue
                    if wanted(filter, raw.stream_name, raw.type):
                        yield to_recorded(raw)
        finally:
            with contextlib.suppress(Exception):
                await subscription.stop()

    # ----------------------------------------------------- persistent subscriptions

    async def create_subscription_group(self, group: str, settings: SubscriptionSettings) -> None:
        plan = server_filter(settings.filter)
        with _client_errors():
            try:
                if settings.from_position is None:
                    await self._client.create_subscription_to_all(
                        group,
                        filter_include=plan.include,
                        filter_exclude=plan.exclude,
                        filter_by_stream_name=plan.by_stream_name,
                        consumer_strategy=CONSUMER_STRATEGY,
                        message_timeout=settings.ack_timeout_seconds,
                        max_retry_count=server_max_retry_count(settings.max_retry),
                        min_checkpoint_count=MIN_CHECKPOINT_COUNT,
                        max_checkpoint_count=MAX_CHECKPOINT_COUNT,
                        checkpoint_after=CHECKPOINT_AFTER,
                        max_subscriber_count=0,  # unlimited
                        timeout=self._timeout,
                    )
                else:
                    await self._client.create_subscription_to_all(
                        group,
                        commit_position=settings.from_position,
                        filter_include=plan.include,
                        filter_exclude=plan.exclude,
                        filter_by_stream_name=plan.by_stream_name,
                        consumer_strategy=CONSUMER_STRATEGY,
                        message_timeout=settings.ack_timeout_seconds,
                        max_retry_count=server_max_retry_count(settings.max_retry),
                        min_checkpoint_count=MIN_CHECKPOINT_COUNT,
                        max_checkpoint_count=MAX_CHECKPOINT_COUNT,
                        checkpoint_after=CHECKPOINT_AFTER,
                        max_subscriber_count=0,
                        timeout=self._timeout,
                    )
            except AlreadyExistsError as exc:
                raise SubscriptionGroupExists(group) from exc
            # Written only once the group exists, so a failed create never overwrites
            # the settings of the group that is already there.
            record = GroupRecord(settings=settings, incarnation=uuid.uuid4())
            await self._client.append_to_stream(
                settings_stream(group),
                events=[KdbNewEvent(type="SubscriptionGroup", data=msgspec.json.encode(record))],
                current_version=KdbStreamState.ANY,
                timeout=self._timeout,
            )
            await self._client.set_stream_metadata(
                notes_stream(group, record.incarnation), metadata={"$maxCount": 10_000}, timeout=self._timeout
            )

    async def ensure_subscription_group(self, group: str, settings: SubscriptionSettings) -> None:
        with contextlib.suppress(SubscriptionGroupExists):
            await self.create_subscription_group(group, settings)

    async def delete_subscription_group(self, group: str) -> None:
        with _client_errors():
            try:
                await self._client.delete_subscription(group, timeout=self._timeout)
            except NotFoundError as exc:
                raise SubscriptionGroupNotFound(group) from exc
        record = await self._record(group)
        incarnation = record.incarnation if record else None
        for side_stream in (settings_stream(group), notes_stream(group, incarnation)):
            try:
                await self._client.delete_stream(side_stream, current_version=KdbStreamState.ANY)
            except KurrentDBClientError as exc:  # NotFoundError when never written
                log.debug("could not delete %s: %r", side_stream, exc)

    async def _info(self, group: str) -> SubscriptionInfo:
        with _client_errors():
            try:
                return await self._client.get_subscription_info(group, timeout=self._timeout)
            except NotFoundError as exc:
                raise SubscriptionGroupNotFound(group) from exc

    async def _record(self, group: str) -> GroupRecord | None:
        """orderstream's record of the group (``None`` for a group created by other tools:
        then only the server-side half of its filter applies)."""
        with _client_errors():
            try:
                latest = await self._client.get_stream(settings_stream(group), backwards=True, limit=1)
            except NotFoundError:
                return None
        if not latest:
            return None
        try:
            return msgspec.json.decode(latest[0].data, type=GroupRecord)
        except msgspec.DecodeError:
            log.warning("unreadable record of subscription group %s; filtering on the server only", group)
            return None

    async def connect_subscription_group(
        self, group: str, *, prefetch: int | None = None
    ) -> PersistentSubscription:
        info = await self._info(group)
        record = await self._record(group)
        settings = record.settings if record else None
        buffer_size = prefetch or self._consumer_buffer_size

        async def open_raw() -> AbstractAsyncPersistentSubscription:
            with _client_errors():
                try:
                    return await self._client.read_subscription_to_all(
                        group,
                        event_buffer_size=buffer_size,
                        max_ack_batch_size=max(1, buffer_size // 2),
                        max_ack_delay=0.02,
                    )
                except NotFoundError as exc:
                    raise SubscriptionGroupNotFound(group) from exc

        async def count_other_consumers() -> int:
            return max(0, len((await self._info(group)).connections) - 1)

        subscription = KurrentDBPersistentSubscription(
            backend=self,
            group=group,
            open_raw=open_raw,
            count_other_consumers=count_other_consumers,
            event_filter=settings.filter if settings else None,
            skip_upto=settings.from_position if settings else parse_all_position(info.start_from),
            max_retry=info.max_retry_count + 1,
            message_timeout=info.message_timeout,
        )
        await subscription.connect()
        return subscription

    async def subscription_group_info(self, group: str) -> GroupInfo:
        info = await self._info(group)
        record = await self._record(group)
        settings = record.settings if record else None
        checkpoint = parse_all_position(info.last_checkpointed_event_position)
        # Lag: matching events after the server's checkpoint (or after the group's start),
        # counted with a filtered read, capped at lag_count_limit.
        start = checkpoint if checkpoint is not None else (settings.from_position if settings else None)
        lag = len(
            await self.read_all(
                after=start,
                filter=settings.filter if settings else None,
                limit=self._lag_count_limit,
            )
        )
        return GroupInfo(
            group=group,
            checkpoint=checkpoint,
            last_position=await self.head_position(),
            in_flight=info.total_in_flight_messages,
            parked=info.parked_message_count,
            lag_events=lag,
        )

    async def list_parked(self, group: str, *, limit: int = 100) -> list[ParkedEvent]:
        await self._info(group)
        notes = await self._park_notes(group)
        out: list[ParkedEvent] = []
        with _client_errors():
            try:
                raws = await self._client.get_stream(parked_stream(group), resolve_links=True, limit=limit)
            except NotFoundError:
                return []
            for raw in raws:
                link = raw.link
                if link is None or raw.is_link_event:  # unresolvable link (event deleted)
                    continue
                parked = parse_parked_link_metadata(link.metadata)
                note = notes.get(raw.id)
                out.append(
                    ParkedEvent(
                        event=to_recorded(raw, position=await self.true_position(raw)),
                        reason=note.reason if note else parked.reason,
                        attempts=note.attempts if note else (parked.attempts or 1),
                        # "Added" is the server's parking time. The client gives the link
                        # the *original* event's timestamp (it reads "created" from the
                        # event, not the link), so that is only a last resort.
                        parked_at=parked.added or link.recorded_at or datetime.now(UTC),
                    )
                )
        return out

    async def replay_parked(self, group: str) -> int:
        await self._info(group)
        with _client_errors():
            try:
                links = await self._client.get_stream(parked_stream(group))
            except NotFoundError:
                return 0
            if not links:
                return 0
            last_link = links[-1].stream_position
            await self._client.replay_parked_events(group, timeout=self._timeout)
            # The server replays in the background and then truncates the parked stream
            # ($tb); wait (bounded) until it has, so list_parked no longer shows them.
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline:
                try:
                    remaining = await self._client.get_stream(parked_stream(group), limit=1)
                except NotFoundError:
                    break
                if not remaining or remaining[0].stream_position > last_link:
                    break
                await asyncio.sleep(0.1)
        return len(links)

    async def skip_parked(self, group: str, position: int, *, actor: str, reason: str) -> SkippedEvent:
        """Not on KurrentDB yet: its parked stream cannot drop one event (a replay
        delivers all of them), so a skip would need the consumer to ack recorded skips
        on their redelivery. Fix the projection and replay instead."""
        raise EventStoreError(
            "skipping one parked event is not supported on KurrentDB; "
            "fix the cause and replay the parked events"
        )

    async def list_skipped(self, group: str, *, limit: int = 100) -> list[SkippedEvent]:
        await self._info(group)
        return []

    async def _park_notes(self, group: str) -> dict[uuid.UUID, ParkNote]:
        record = await self._record(group)
        notes: dict[uuid.UUID, ParkNote] = {}
        stream = notes_stream(group, record.incarnation if record else None)
        with _client_errors():
            async for raw in self._stream_backwards(stream, max_events=1_000):
                with contextlib.suppress(msgspec.DecodeError):
                    note = msgspec.json.decode(raw.data, type=ParkNote)
                    notes.setdefault(note.event_id, note)  # newest first wins
        return notes

    # ------------------------------------------- what a consumer needs (ConsumerBackend)

    async def group_checkpoint(self, group: str) -> int | None:
        return parse_all_position((await self._info(group)).last_checkpointed_event_position)

    async def previous_matching(
        self, stream: str, revision: int, event_filter: EventFilter | None
    ) -> tuple[int, int] | None:
        if revision <= 0:
            return None
        with _client_errors():
            try:
                earlier = await self._client.get_stream(
                    stream, stream_position=revision - 1, backwards=True, limit=20
                )
            except NotFoundError:
                return None
        for raw in earlier:
            if wanted(event_filter, raw.stream_name, raw.type):
                return raw.stream_position, raw.commit_position
        return None

    async def write_park_note(self, group: str, note: ParkNote) -> None:
        try:
            record = await self._record(group)
            with _client_errors():
                await self._client.append_to_stream(
                    notes_stream(group, record.incarnation if record else None),
                    events=[KdbNewEvent(type="ParkNote", data=msgspec.json.encode(note))],
                    current_version=KdbStreamState.ANY,
                    timeout=self._timeout,
                )
        except EventStoreError:
            log.warning("could not record why event %s was parked in group %s", note.event_id, group)

    async def true_position(self, raw: KdbRecordedEvent) -> int:
        """The ``$all`` position of an event delivered through a link (a replayed or
        listed parked event): some servers report the link's position for both."""
        if raw.link is None:
            return raw.commit_position
        try:
            found = await self._client.get_stream(
                raw.stream_name, stream_position=raw.stream_position, limit=1
            )
        except KurrentDBClientError:
            return raw.commit_position
        return found[0].commit_position if found and found[0].id == raw.id else raw.commit_position


# ------------------------------------------------------------------ test container


def start_test_container(image: str = TEST_IMAGE, *, startup_timeout: float = 120.0) -> str:
    """Start an insecure single-node KurrentDB with testcontainers (needs a Docker engine),
    wait until it accepts writes, and return its URI. The container is removed at exit."""
    from kurrentdbclient import KurrentDBClient
    from kurrentdbclient import NewEvent as SyncNewEvent
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import HttpWaitStrategy

    container = (
        DockerContainer(image)
        .with_envs(
            KURRENTDB_CLUSTER_SIZE="1",
            KURRENTDB_INSECURE="true",
            KURRENTDB_MEM_DB="true",
            KURRENTDB_RUN_PROJECTIONS="None",
            KURRENTDB_NODE_PORT="2113",
        )
        .with_exposed_ports(2113)
        .waiting_for(
            HttpWaitStrategy(2113, "/health/live")
            .for_status_code(204)
            .with_startup_timeout(int(startup_timeout))
        )
    )
    container.start()
    atexit.register(container.stop)
    uri = f"kurrentdb://{container.get_container_host_ip()}:{container.get_exposed_port(2113)}?tls=false"

    # /health/live answers before the node has become leader; wait until it takes a write.
    client = KurrentDBClient(uri)
    deadline = time.monotonic() + startup_timeout
    try:
        while True:
            try:
                client.append_to_stream(
                    "$orderstream-readiness",
                    events=[SyncNewEvent(type="Ready", data=b"{}")],
                    current_version=KdbStreamState.ANY,
                    timeout=5,
                )
                break
            except KurrentDBClientError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    finally:
        client.close()
    return uri


if TYPE_CHECKING:

    def _conforms(
        store: KurrentDBEventStore, sub: KurrentDBPersistentSubscription
    ) -> tuple[EventStore, PersistentSubscription, ConsumerBackend]:
        return store, sub, store


_record_decoder = msgspec.json.Decoder(IdempotencyRecord)


def idempotency_stream(actor: str, key: str, stream: str) -> str:
    """``idempotency-{digest}``: one stream per (actor, key, stream), written once."""
    digest = hashlib.sha256(f"{actor}\x1f{key}\x1f{stream}".encode()).hexdigest()[:40]
    return f"idempotency-{digest}"
