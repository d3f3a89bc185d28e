"""The stand-in's persistent subscription groups on ``$all`` (Pinned strategy).

STAND-IN, NOT KURRENTDB. Modelled on KurrentDB's documented behaviour
(docs.kurrent.io "Persistent subscriptions": consumer strategies, checkpoints, parked
messages, replay) and on what kurrentdbclient's tests assert
(``tests/test_client.py``: ``test_subscription_to_all_read_with_nack_park`` / ``_retry`` /
``_skip``, ``..._message_timeout_event_buffer_size_10``, ``test_subscription_to_all_replay_parked``).
Where neither says enough, the choice is marked ASSUMED and listed in docs/kurrentdb.md.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
import uuid
import zlib
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime

from tests.kurrentdb_standin.log import LINK_TYPE, Log, Record, RegexFilter

BUCKETS = 1024
"""The Pinned strategy hashes each event's source stream into one of 1024 buckets, each
owned by one consumer (KurrentDB docs, "Consumer strategies: Pinned")."""


TICK = 1.0
"""Message timeouts are checked on the server's timer tick, once a second (ASSUMED from
the server source; kurrentdbclient test_subscription_to_all_read_with_max_retry_count_3
acks 0.2 s late with a 0.1 s timeout and still sees no redelivery of acked events), so
an event times out between ``message_timeout`` and ``message_timeout + 1 s``."""


@dataclass
class Settings:
    start: int | None
    """First ``$all`` position to deliver (inclusive, like the server's start position)."""
    event_filter: RegexFilter | None
    strategy: str
    message_timeout: float
    max_retry_count: int
    min_checkpoint_count: int
    max_checkpoint_count: int
    checkpoint_after: float
    max_subscriber_count: int


@dataclass
class Message:
    event: Record
    link: Record | None
    """Set for a replayed parked event: it is delivered through its parked link and acked
    by the link's id (kurrentdbclient ``RecordedEvent.ack_id``)."""
    retry_count: int = 0
    consumer: int | None = None
    deadline: float = 0.0

    @property
    def ack_id(self) -> uuid.UUID:
        return self.link.id if self.link is not None else self.event.id


@dataclass
class Consumer:
    id: int
    buffer_size: int
    outbox: asyncio.Queue[Message | None] = field(default_factory=asyncio.Queue)
    in_flight: set[uuid.UUID] = field(default_factory=set)
    total: int = 0

    @property
    def free_slots(self) -> int:
        return self.buffer_size - len(self.in_flight)


def bucket_of(stream: str) -> int:
    return zlib.crc32(stream.encode()) % BUCKETS


class Group:
    """One group: reads ``$all`` from its start through its filter, hands messages to its
    consumers by bucket, retries, parks, checkpoints."""

    def __init__(self, name: str, settings: Settings, log: Log) -> None:
        self.name = name
        self.settings = settings
        self._log = log
        self._cursor = log.index_after(settings.start, inclusive=True)
        self._retry: deque[Message] = deque()
        self._live: deque[Message] = deque()
        self.outstanding: dict[uuid.UUID, Message] = {}
        self.consumers: dict[int, Consumer] = {}
        self._owner: list[int | None] = [None] * BUCKETS
        # Positions of the group's own events in read order, and those settled: the
        # checkpoint is the last settled position before the first unsettled one.
        self._window: deque[int] = deque()
        self._settled: set[int] = set()
        self._low_water: int | None = None
        self.checkpoint: int | None = None
        self._settled_since_checkpoint = 0
        self._last_checkpoint_at = time.monotonic()
        self.wake = asyncio.Event()
        self._last_tick = time.monotonic()

    # ------------------------------------------------------------------ names

    @property
    def subscription_id(self) -> str:
        return f"$all::{self.name}"

    @property
    def parked_stream(self) -> str:
        """``"$persistentsubscription-" + subscriptionId + "-parked"`` (KurrentDB docs,
        "Parked messages"; kurrentdbclient's tests read it by that name)."""
        return f"$persistentsubscription-{self.subscription_id}-parked"

    @property
    def checkpoint_stream(self) -> str:
        return f"$persistentsubscription-{self.subscription_id}-checkpoint"

    def parked_count(self) -> int:
        return len(self._log.stream(self.parked_stream) or [])

    # ------------------------------------------------------------------ consumers

    def add_consumer(self, consumer: Consumer) -> None:
        """Buckets are assigned lazily, on a bucket's first message, to the connected
        consumer with the fewest buckets. A joining consumer takes over buckets from
        consumers above a balanced share, those with the fewest events in flight first,
        so possibly some still in flight elsewhere (as KurrentDB's PinnedConsumerState
        does: AddNode / AssignBucket / ChooseClient; read, not copied). The adapter's
        consumer guards against that second case."""
        self.consumers[consumer.id] = consumer
        assigned = [b for b in range(BUCKETS) if self._owner[b] in self.consumers]
        balanced = -(-len(assigned) // len(self.consumers))  # ceiling
        in_flight = collections.Counter(bucket_of(m.event.stream) for m in self.outstanding.values())
        for other in list(self.consumers):
            if other == consumer.id:
                continue
            owned = [b for b in assigned if self._owner[b] == other]
            for b in sorted(owned, key=lambda b: in_flight[b])[: max(0, len(owned) - balanced)]:
                self._owner[b] = consumer.id
        self.wake.set()

    def _owner_of(self, b: int) -> Consumer | None:
        owner = self._owner[b]
        if owner not in self.consumers:  # unassigned, or its consumer left
            if not self.consumers:
                return None
            counts = collections.Counter(self._owner)
            owner = min(self.consumers, key=lambda c: counts[c])
            self._owner[b] = owner
        return self.consumers[owner]

    def remove_consumer(self, consumer_id: int) -> None:
        """A consumer that leaves: its buckets are reassigned on their next message and
        its in-flight messages are retried, counting a delivery (ASSUMED from the server's
        PersistentSubscription.RemoveClientByConnectionId)."""
        if self.consumers.pop(consumer_id, None) is None:
            return
        lost = sorted(
            (m for m in self.outstanding.values() if m.consumer == consumer_id),
            key=lambda m: m.event.position,
        )
        for m in lost:
            del self.outstanding[m.ack_id]
            self._retry_or_park(m)
        self.wake.set()

    # ------------------------------------------------------------------ settling

    def ack(self, ack_ids: list[uuid.UUID]) -> None:
        for ack_id in ack_ids:
            m = self._take(ack_id)
            if m is not None:
                self._settle(m)
        self.wake.set()

    def nack(self, ack_ids: list[uuid.UUID], action: str, reason: str) -> None:
        """Park / retry / skip (KurrentDB docs, "Acknowledgements": Nack actions). "stop"
        and "unknown" are retried here."""
        for ack_id in ack_ids:
            m = self._take(ack_id)
            if m is None:
                continue
            if action == "park":
                self._park(m, f"Client explicitly NAK'ed message.\n{reason}")
            elif action == "skip":
                self._settle(m)
            else:
                self._retry_or_park(m)
        self.wake.set()

    def _take(self, ack_id: uuid.UUID) -> Message | None:
        m = self.outstanding.pop(ack_id, None)
        if m is not None and m.consumer in self.consumers:
            self.consumers[m.consumer].in_flight.discard(ack_id)
        return m

    def _retry_or_park(self, m: Message) -> None:
        """Park once the retry count (0 on the first delivery) has reached
        ``max_retry_count``, else retry with the count + 1 (KurrentDB docs, "Max retry
        count"; the reason text is the server's: "Reached retry count of N")."""
        if m.retry_count >= self.settings.max_retry_count:
            self._park(m, f"Reached retry count of {self.settings.max_retry_count}")
        else:
            m.retry_count += 1
            m.consumer = None
            self._retry.append(m)

    def _park(self, m: Message, reason: str) -> None:
        metadata = json.dumps(
            {
                "Added": datetime.now(UTC).isoformat(),
                "Reason": reason,
                "SubscriptionEventNumber": m.event.position,
            }
        ).encode()
        self._log.write_system(
            self.parked_stream, LINK_TYPE, f"{m.event.revision}@{m.event.stream}".encode(), metadata
        )
        self._settle(m)

    def _settle(self, m: Message) -> None:
        if m.link is None:
            self._settled.add(m.event.position)
            while self._window and self._window[0] in self._settled:
                position = self._window.popleft()
                self._settled.discard(position)
                self._low_water = position
        self._settled_since_checkpoint += 1

    def replay_parked(self) -> None:
        """Deliver the parked events again, through their links and counting afresh, then
        truncate the parked stream (KurrentDB docs, "Replay parked messages";
        kurrentdbclient ``test_subscription_to_all_replay_parked``)."""
        links = self._log.stream(self.parked_stream) or []
        for link in links:
            target = self._log.resolve(link)
            if target is not None:
                self._retry.append(Message(event=target, link=link))
        if links:
            # The server truncates in the background once it has read the links
            # (test_subscription_to_all_replay_parked sleeps before replaying); here after
            # a short delay, so callers that wait for it are exercised.
            before = links[-1].revision + 1
            asyncio.get_running_loop().call_later(0.2, self._log.truncate, self.parked_stream, before)
        self.wake.set()

    # ------------------------------------------------------------------ the pump

    def pump(self) -> None:
        """One round: time out (on a once-a-second tick), read new events, dispatch,
        checkpoint."""
        now = time.monotonic()
        if now - self._last_tick >= TICK:
            self._last_tick = now
            for m in [m for m in self.outstanding.values() if m.deadline <= now]:
                self._take(m.ack_id)
                self._retry_or_park(m)
        self._read_new()
        self._dispatch(self._retry, now)
        self._dispatch(self._live, now)
        self._maybe_checkpoint(now)

    def _read_new(self) -> None:
        records = self._log.records
        while self._cursor < len(records):
            record = records[self._cursor]
            self._cursor += 1
            if self.settings.event_filter is None or self.settings.event_filter.matches(record):
                self._live.append(Message(event=record, link=None))
                self._window.append(record.position)

    def _dispatch(self, queue: deque[Message], now: float) -> None:
        """Send in order; a message whose bucket's consumer is full waits, and so do the
        later messages of its stream (they share the bucket)."""
        waiting: deque[Message] = deque()
        blocked: set[int] = set()
        while queue:
            m = queue.popleft()
            b = bucket_of(m.event.stream)
            consumer = None if b in blocked else self._owner_of(b)
            if consumer is None or b in blocked or consumer.free_slots <= 0:
                blocked.add(b)
                waiting.append(m)
                continue
            m.consumer, m.deadline = consumer.id, now + self.settings.message_timeout
            self.outstanding[m.ack_id] = m
            consumer.in_flight.add(m.ack_id)
            consumer.total += 1
            consumer.outbox.put_nowait(m)
        queue.extend(waiting)

    def _maybe_checkpoint(self, now: float) -> None:
        """Write the low-water mark after ``checkpoint_after`` once ``min_checkpoint_count``
        messages were settled, or at once after ``max_checkpoint_count`` (KurrentDB docs,
        "Checkpointing"; the timing is ASSUMED)."""
        if self._low_water is None or self._low_water == self.checkpoint:
            return
        due = now - self._last_checkpoint_at >= self.settings.checkpoint_after
        if (due and self._settled_since_checkpoint >= self.settings.min_checkpoint_count) or (
            self._settled_since_checkpoint >= self.settings.max_checkpoint_count
        ):
            self.checkpoint = self._low_water
            self._settled_since_checkpoint = 0
            self._last_checkpoint_at = now
            self._log.write_system(
                self.checkpoint_stream,
                "$SubscriptionCheckpoint",
                json.dumps(f"C:{self.checkpoint}/P:{self.checkpoint}").encode(),
            )

    def in_retry(self) -> int:
        return len(self._retry)

    def close(self) -> None:
        for consumer in self.consumers.values():
            consumer.outbox.put_nowait(None)
        self.consumers.clear()
