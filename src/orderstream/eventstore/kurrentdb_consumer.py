"""One consumer of a KurrentDB persistent subscription group (``$all``, ``Pinned``).

The port promises that the events of one stream reach one consumer at a time and in
revision order. KurrentDB's ``Pinned`` strategy pins each source stream to one
consumer, which gets most of the way; this class closes three gaps that the server
source (``PersistentSubscription``, ``PinnedConsumerState``) shows:

1. **Retry overtaking.** A nacked (retry) event goes to the server's retry buffer,
   but later events of the same stream may already be prefetched here. They are held
   until the retried event comes back and is settled (bounded by ``hold_timeout``).
2. **Buckets moving on join.** When a consumer joins, the server moves buckets to it,
   preferring idle ones but also moving buckets whose events are still in flight at
   another consumer. A consumer that joined while others were connected therefore
   checks, for a stream it has not seen yet, that the stream's previous matching event
   is behind the group's checkpoint before delivering (bounded by ``hold_timeout``;
   only during the first ``message_timeout`` after connecting).
3. **Hung consumers keep their streams.** A timed-out event is re-sent to the bucket's
   consumer, i.e. to the consumer that did not ack it. When the server re-sends an
   event that the application still holds, this consumer drops its connection so the
   server hands its events to the other consumers, and reconnects when the
   application asks for the next event.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from kurrentdbclient import RecordedEvent as KdbRecordedEvent

from orderstream.eventstore.base import (
    EventFilter,
    EventStoreError,
    EventStoreUnavailable,
    NackAction,
    RecordedEvent,
)
from orderstream.eventstore.kurrentdb_mapping import (
    ParkNote,
    client_nack_action,
    decode_metadata,
    wanted,
)

if TYPE_CHECKING:
    from kurrentdbclient.common import AbstractAsyncPersistentSubscription

log = logging.getLogger(__name__)


class ConsumerBackend(Protocol):
    """What a consumer needs from the store (kept narrow so it can be tested alone)."""

    async def true_position(self, raw: KdbRecordedEvent) -> int: ...

    async def previous_matching(
        self, stream: str, revision: int, event_filter: EventFilter | None
    ) -> tuple[int, int] | None:
        """``(revision, position)`` of the stream's last event before ``revision`` that
        the group's filter lets through, ``None`` if there is none (nearby)."""
        ...

    async def group_checkpoint(self, group: str) -> int | None: ...

    async def write_park_note(self, group: str, note: ParkNote) -> None: ...


def to_recorded(raw: KdbRecordedEvent, *, position: int | None = None) -> RecordedEvent:
    schema_version, metadata = decode_metadata(raw.metadata)
    return RecordedEvent(
        id=raw.id,
        stream=raw.stream_name,
        revision=raw.stream_position,
        position=raw.commit_position if position is None else position,
        type=raw.type,
        schema_version=schema_version,
        data=raw.data,
        metadata_json=metadata,
        # The client decodes the server's "created" timestamp as UTC; None only when
        # the server sent none, which it does not for stored events.
        recorded_at=raw.recorded_at if raw.recorded_at is not None else datetime.now(UTC),
    )


@dataclass
class _InFlight:
    ack_id: uuid.UUID
    retry_count: int
    generation: int
    delivered: bool = False


@dataclass
class _Block:
    """Later events of a stream wait here until ``event_id`` is settled (a retry) or
    the group's checkpoint reaches ``until_position`` (a stream new to this consumer)."""

    deadline: float
    event_id: uuid.UUID | None = None
    until_position: int | None = None
    held: list[RecordedEvent] = field(default_factory=list)


@dataclass
class _End:
    generation: int


OpenRaw = Callable[[], Awaitable["AbstractAsyncPersistentSubscription"]]


class KurrentDBPersistentSubscription:
    """:class:`~orderstream.eventstore.base.PersistentSubscription` on a KurrentDB group."""

    def __init__(
        self,
        *,
        backend: ConsumerBackend,
        group: str,
        open_raw: OpenRaw,
        count_other_consumers: Callable[[], Awaitable[int]],
        event_filter: EventFilter | None,
        skip_upto: int | None,
        max_retry: int,
        message_timeout: float,
    ) -> None:
        self._backend = backend
        self._group = group
        self._open_raw = open_raw
        self._count_other_consumers = count_other_consumers
        self._filter = event_filter
        self._skip_upto = skip_upto
        self._max_retry = max_retry
        self._message_timeout = message_timeout
        self._hold_timeout = max(0.5, message_timeout / 2)
        self._queue: asyncio.Queue[tuple[int, KdbRecordedEvent] | _End] = asyncio.Queue()
        self._ready: collections.deque[RecordedEvent] = collections.deque()
        self._in_flight: dict[uuid.UUID, _InFlight] = {}
        self._blocks: dict[str, _Block] = {}
        self._seen_revision: dict[str, int] = {}
        self._raw: AbstractAsyncPersistentSubscription | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._generation = 0
        self._detached = False
        self._closed = False
        self._error: BaseException | None = None
        self._check_joins_until = 0.0
        self._checkpoint: int | None = None
        self._checkpoint_read_at = 0.0

    # ------------------------------------------------------------------ connection

    async def connect(self) -> None:
        raw = await self._open_raw()
        self._generation += 1
        self._raw = raw
        self._detached = False
        self._error = None
        # Only a consumer that joins a group other consumers are in can be handed a
        # stream whose earlier events are still in flight elsewhere (point 2 above).
        try:
            others = await self._count_other_consumers()
        except EventStoreError:
            others = 1
        self._check_joins_until = time.monotonic() + self._message_timeout if others > 0 else 0.0
        self._pump_task = asyncio.get_running_loop().create_task(self._pump(self._generation, raw))

    async def _pump(self, generation: int, raw: AbstractAsyncPersistentSubscription) -> None:
        detach = False
        try:
            async for event in raw:
                entry = self._in_flight.get(event.id)
                if entry is not None and entry.delivered and entry.generation == generation:
                    # Re-sent while the application still holds it: the server timed it
                    # out. Let go of the connection so the group's other consumers get it.
                    log.warning(
                        "group %s: event %s not settled within %.1fs; handing this consumer's "
                        "events back to the group",
                        self._group,
                        event.id,
                        self._message_timeout,
                    )
                    detach = True
                    break
                await self._queue.put((generation, event))
        except Exception as exc:
            if generation == self._generation:
                self._error = exc
        finally:
            if detach and generation == self._generation:
                self._drop_connection_state()
                with contextlib.suppress(Exception):
                    await raw.stop(timeout=5)
            self._queue.put_nowait(_End(generation))

    def _drop_connection_state(self) -> None:
        """Forget what this connection had not yet shown the application: the server
        retries all of it once the connection is gone."""
        self._detached = True
        self._ready.clear()
        self._blocks.clear()
        for event_id in [k for k, v in self._in_flight.items() if not v.delivered]:
            del self._in_flight[event_id]

    # ------------------------------------------------------------------ iteration

    def __aiter__(self) -> AsyncIterator[RecordedEvent]:
        return self

    async def __anext__(self) -> RecordedEvent:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._detached:
                await self.connect()
            self._release_blocks(time.monotonic())
            if self._ready:
                event = self._ready.popleft()
                entry = self._in_flight.get(event.id)
                if entry is not None:
                    entry.delivered = True
                self._seen_revision[event.stream] = max(
                    event.revision, self._seen_revision.get(event.stream, -1)
                )
                return event
            if any(b.until_position is not None for b in self._blocks.values()):
                await self._refresh_checkpoint()
                self._release_blocks(time.monotonic())
                if self._ready:
                    continue
            timeout = self._next_wake()
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                continue
            if isinstance(item, _End):
                if item.generation != self._generation or self._detached:
                    continue  # an old connection ended, or we reconnect above
                if self._closed:
                    raise StopAsyncIteration
                error, self._error = self._error, None
                if error is not None:
                    raise EventStoreUnavailable(
                        f"subscription to group {self._group!r} ended: {type(error).__name__}: {error}"
                    ) from error
                raise EventStoreUnavailable(f"the server ended the subscription to group {self._group!r}")
            generation, raw = item
            if generation == self._generation and not self._detached:
                await self._accept(generation, raw)

    def _next_wake(self) -> float | None:
        deadlines = [b.deadline for b in self._blocks.values()]
        if any(b.until_position is not None for b in self._blocks.values()):
            deadlines.append(time.monotonic() + 0.25)  # poll the checkpoint
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    async def _accept(self, generation: int, raw: KdbRecordedEvent) -> None:
        entry = self._in_flight.get(raw.id)
        if entry is not None and not entry.delivered:
            # Re-sent while still waiting here (held or queued): keep one copy.
            entry.ack_id, entry.retry_count = raw.ack_id, raw.retry_count or 0
            return
        before_start = (
            raw.link is None and self._skip_upto is not None and raw.commit_position <= self._skip_upto
        )
        if before_start or not wanted(self._filter, raw.stream_name, raw.type):
            ack_id = raw.ack_id
            await self._send(lambda sub: sub.ack(ack_id))
            return
        position = await self._backend.true_position(raw)
        event = to_recorded(raw, position=position)
        gate = await self._gate_position(event)
        if generation != self._generation or self._detached:
            return  # the connection went away while we were looking things up
        self._in_flight[event.id] = _InFlight(
            ack_id=raw.ack_id, retry_count=raw.retry_count or 0, generation=generation
        )
        block = self._blocks.get(event.stream)
        if block is not None and block.event_id != event.id:
            block.held.append(event)
        elif block is None and gate is not None:
            self._blocks[event.stream] = _Block(
                deadline=time.monotonic() + self._hold_timeout, until_position=gate, held=[event]
            )
        else:
            self._ready.append(event)

    async def _gate_position(self, event: RecordedEvent) -> int | None:
        """Position the group's checkpoint must reach before ``event`` may be delivered,
        or ``None`` when it may go now (point 2 of the module docstring)."""
        if time.monotonic() >= self._check_joins_until or event.revision == 0:
            return None
        if event.stream in self._blocks:
            return None  # held behind the stream's earlier event anyway
        known = max(
            [self._seen_revision.get(event.stream, -1)]
            + [e.revision for e in self._ready if e.stream == event.stream]
        )
        if known >= event.revision - 1:
            return None
        previous = await self._backend.previous_matching(event.stream, event.revision, self._filter)
        if previous is None or previous[0] <= known:
            return None
        if self._skip_upto is not None and previous[1] <= self._skip_upto:
            return None
        await self._refresh_checkpoint()
        if self._checkpoint is not None and self._checkpoint >= previous[1]:
            return None
        return previous[1]

    async def _refresh_checkpoint(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checkpoint_read_at < 0.25:
            return
        self._checkpoint_read_at = now
        with contextlib.suppress(EventStoreError):
            self._checkpoint = await self._backend.group_checkpoint(self._group)

    def _release_blocks(self, now: float) -> None:
        for stream, block in list(self._blocks.items()):
            if block.until_position is not None:
                reached = self._checkpoint is not None and self._checkpoint >= block.until_position
                if not reached and block.deadline > now:
                    continue
                if not reached:
                    log.warning(
                        "group %s: %s's previous event was not checkpointed within %.1fs; delivering",
                        self._group,
                        stream,
                        self._hold_timeout,
                    )
            elif block.deadline > now:
                continue
            else:
                log.warning(
                    "group %s: retried event %s of %s did not come back within %.1fs; "
                    "delivering the stream's later events",
                    self._group,
                    block.event_id,
                    stream,
                    self._hold_timeout,
                )
            del self._blocks[stream]
            self._ready.extendleft(reversed(block.held))

    def _settled(self, event: RecordedEvent) -> None:
        block = self._blocks.get(event.stream)
        if block is not None and block.event_id == event.id:
            del self._blocks[event.stream]
            self._ready.extendleft(reversed(block.held))

    # ------------------------------------------------------------------ ack / nack

    async def _send(self, call: Callable[[AbstractAsyncPersistentSubscription], Awaitable[None]]) -> None:
        if self._raw is None or self._detached or self._closed:
            return
        try:
            await call(self._raw)
        except Exception as exc:  # ProgrammingError once stopped, gRPC errors
            raise EventStoreUnavailable(f"cannot settle an event of group {self._group!r}: {exc!r}") from exc

    def _current(self, event: RecordedEvent) -> _InFlight | None:
        """The in-flight entry if the event came through the live connection (acks for
        events of a dropped connection are not sent: the server already retried them)."""
        entry = self._in_flight.pop(event.id, None)
        if entry is None or entry.generation != self._generation or self._detached:
            return None
        return entry

    async def ack(self, event: RecordedEvent) -> None:
        entry = self._current(event)
        if entry is None:
            return
        ack_id = entry.ack_id
        await self._send(lambda sub: sub.ack(ack_id))
        self._settled(event)

    async def nack(self, event: RecordedEvent, action: NackAction, reason: str = "") -> None:
        entry = self._current(event)
        if entry is None:
            return
        deliveries = entry.retry_count + 1
        parks = action is NackAction.PARK or (action is NackAction.RETRY and deliveries >= self._max_retry)
        if parks:
            # The client's nack() sends no reason; keep ours (and the count) beside it.
            why = reason or "parked by the consumer"
            if action is NackAction.RETRY:
                why = f"retry limit reached after {deliveries} deliveries" + (f": {reason}" if reason else "")
            await self._backend.write_park_note(
                self._group, ParkNote(event_id=event.id, reason=why, attempts=deliveries)
            )
        ack_id, client_action = entry.ack_id, client_nack_action(action)
        await self._send(lambda sub: sub.nack(ack_id, client_action))
        if action is NackAction.RETRY and not parks:
            # Later events of this stream wait until the retried one is settled.
            held = [e for e in self._ready if e.stream == event.stream]
            for e in held:
                self._ready.remove(e)
            previous = self._blocks.get(event.stream)
            self._blocks[event.stream] = _Block(
                deadline=time.monotonic() + self._hold_timeout,
                event_id=event.id,
                held=held + (previous.held if previous is not None else []),
            )
        else:
            self._settled(event)

    async def keep_alive(self) -> None:
        """A no-op: KurrentDB has no way to renew a message timeout (the group's
        ``message_timeout`` must cover the longest a consumer works on an event)."""
        return None

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        raw, task = self._raw, self._pump_task
        if raw is not None and not self._detached:
            with contextlib.suppress(Exception):
                await raw.stop(timeout=5)  # sends queued acks; the server retries the rest
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self._queue.put_nowait(_End(self._generation))
