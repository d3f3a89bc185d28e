"""A batch consumer over a persistent subscription group, shared by every projection
runner and by the saga trigger.

It owns the part of consuming that has nothing to do with what the events mean:

- a *pump* task reads the subscription into a bounded queue, and batches are taken
  from it (up to ``batch_size``, what is queued; ``linger_seconds`` waits for more);
  the group hands a stream's events to one consumer in order, in runs, so a batch
  may hold many events of one hot stream;
- a *heartbeat* renews the leases of every event this consumer holds (delivered,
  queued or being handled) every third of the ack timeout, so that a batch that takes
  long (a downstream outage) is neither redelivered elsewhere nor counted as a
  failed delivery;
- the handler says, per event, what became of it (:class:`Outcome`), and the consumer
  settles: ack what is done, nack RETRY what failed on its own (counted: after the
  group's ``max_retry`` deliveries it is parked), PARK what can never succeed, hand
  back what was held behind a failed event of its stream;
- **outages are not poison**: events the handler could not hand to an unavailable
  downstream (Temporal, a read store) are *kept*, neither acked nor nacked, and given
  to the handler again after a back-off (tenacity, exponential with jitter) for as
  long as the outage lasts. No delivery is counted, so nothing parks because a
  dependency was down; the heartbeat keeps their leases meanwhile.

Settling happens in one ``gather`` so that the SQLite store turns a batch's acks into
one transaction; held nacks go last (a claim among them could otherwise hand a held
event out again, and its stale nack would count against the new delivery).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from tenacity import RetryCallState, wait_exponential_jitter
from tenacity.wait import wait_base

from orderstream import tracing
from orderstream.application.outage_log import OutageLog
from orderstream.eventstore.base import (
    EventStore,
    EventStoreError,
    NackAction,
    PersistentSubscription,
    RecordedEvent,
)
from orderstream.logging_setup import event_context
from orderstream.services import retry_until_stopped

log = logging.getLogger(__name__)

HELD = "held behind a failed event of its stream"


class Outage(Exception):
    """The downstream cannot take the batch now (down, unreachable, overloaded): not
    the events' fault. The consumer keeps the events and tries again later."""


class StopConsuming(Exception):
    """Raised by a handler or ``prepare`` when this consumer must stop for good
    (a projection runner superseded by a newer version)."""


class PrepareAgain(Exception):
    """Raised by a handler when what ``prepare`` set up is gone (a projection's read
    model deleted while it runs): the consumer disconnects, leaving the batch
    unsettled, and prepares again before it reconnects."""


@dataclass(slots=True)
class Outcome:
    """What became of each event of a batch (an event in none of the lists is
    handed back unsettled when the consumer closes)."""

    done: list[RecordedEvent] = field(default_factory=list)
    retry: list[tuple[RecordedEvent, str]] = field(default_factory=list)
    """Failed on its own: delivered again later, parked after ``max_retry`` deliveries."""
    park: list[tuple[RecordedEvent, str]] = field(default_factory=list)
    """Can never succeed as it is (cannot be decoded, refused): parked now."""
    held: list[RecordedEvent] = field(default_factory=list)
    """Not looked at: after a failed event of its stream, handed back uncounted."""
    unavailable: list[RecordedEvent] = field(default_factory=list)
    """The downstream was unavailable: kept and handed to the handler again after a
    back-off, in order. A stream's events after one of these must be here too."""
    unavailable_reason: str = ""


Handler = Callable[[list[RecordedEvent]], Awaitable[Outcome]]
Prepare = Callable[[], Awaitable[bool]]

_END = object()


class OutageBackoff(wait_base):
    """The wait before reconnecting: ``first`` seconds, doubled with each failed
    attempt of the current outage up to ``longest``. Counted by the outage log, so
    a failure after batches went through again starts short (tenacity's own count
    would keep growing over the consumer's life)."""

    def __init__(self, outage: OutageLog, first: float, longest: float) -> None:
        self.outage, self.first, self.longest = outage, first, longest

    def __call__(self, retry_state: RetryCallState) -> float:
        return min(self.first * 2.0 ** max(self.outage.failures - 1, 0), self.longest)


class BatchConsumer:
    def __init__(
        self,
        event_store: EventStore,
        group: str,
        handler: Handler,
        *,
        name: str | None = None,
        batch_size: int = 256,
        linger_seconds: float = 0.0,
        ack_timeout_seconds: float = 30.0,
        backoff: tuple[float, float] = (0.05, 5.0),
        prepare: Prepare | None = None,
        on_settled: Callable[[], None] | None = None,
    ) -> None:
        """``handler`` gets each batch (raising :class:`Outage` holds all of it);
        ``prepare`` runs before the first connection (creates the group and what the
        handler writes to; ``False`` means do not consume); ``backoff`` is (first,
        longest) delay between attempts during an outage or reconnection;
        ``on_settled`` is called after each settling (the acks are in the store: a
        read-your-writes waiter may look again)."""
        self.event_store = event_store
        self.group = group
        self.handler = handler
        self.name = name or group
        self.batch_size = batch_size
        self.linger_seconds = linger_seconds
        self.ack_timeout_seconds = ack_timeout_seconds
        self.backoff = backoff
        self.prepare = prepare
        self.on_settled = on_settled
        self._outage = OutageLog(log, self.name)
        """Reconnections are logged once per outage (on a full disk: every 0.1 s)."""

    # ------------------------------------------------------------------ connecting

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set or a :class:`StopConsuming`. Event store
        failures (and a subscription that ends) reconnect after a back-off
        (:func:`~orderstream.services.retry_until_stopped`, :class:`OutageBackoff`)."""
        prepared = self.prepare is None

        async def connect_and_consume() -> None:
            nonlocal prepared
            try:
                if not prepared:
                    assert self.prepare is not None
                    if not await self.prepare():
                        return
                    prepared = True
                subscription = await self.event_store.connect_subscription_group(
                    self.group, prefetch=self.batch_size
                )
                try:
                    await self.consume(subscription, stop)
                finally:
                    with contextlib.suppress(Exception):
                        await subscription.close()
            except StopConsuming as exc:
                log.warning("%s: %s; stopping", self.name, exc)
            except PrepareAgain as exc:
                log.warning("%s: %s; preparing again", self.name, exc)
                prepared = self.prepare is None
                raise
            except Exception as exc:
                self._outage.failed(exc, traceback=not isinstance(exc, EventStoreError))
                raise

        await retry_until_stopped(
            connect_and_consume,
            stop,
            errors=(Exception,),
            log_retry=lambda _attempt, _seconds: None,  # the outage log wrote what matters
            wait=OutageBackoff(self._outage, *self.backoff),
        )

    # ------------------------------------------------------------------- consuming

    async def consume(self, subscription: PersistentSubscription, stop: asyncio.Event) -> None:
        """Pump, heartbeat and handle batches from one connection until ``stop``;
        raises when the subscription fails or ends."""
        queue: asyncio.Queue[object] = asyncio.Queue(maxsize=self.batch_size * 2)
        pump = asyncio.create_task(self._pump(subscription, queue), name=f"{self.name}-pump")
        heartbeat = asyncio.create_task(self._heartbeat(subscription), name=f"{self.name}-heartbeat")
        stopped = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                first = asyncio.create_task(queue.get())
                await asyncio.wait({first, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not first.done():
                    first.cancel()
                    return
                batch, end = await self._batch(queue, first.result())
                if batch:
                    await self._handle(subscription, batch, stop)
                if end is _END:
                    raise EventStoreError("the subscription ended")
                if isinstance(end, BaseException):
                    raise end
        finally:
            for task in (stopped, pump, heartbeat):
                task.cancel()
            for task in (pump, heartbeat):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    @staticmethod
    async def _pump(subscription: PersistentSubscription, queue: asyncio.Queue[object]) -> None:
        try:
            async for event in subscription:
                await queue.put(event)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await queue.put(exc)
        else:
            await queue.put(_END)

    async def _heartbeat(self, subscription: PersistentSubscription) -> None:
        interval = max(self.ack_timeout_seconds / 3, 0.01)
        while True:
            await asyncio.sleep(interval)
            try:
                await subscription.keep_alive()
            except Exception as exc:
                log.warning("%s: renewing leases failed: %s", self.name, exc)

    async def _batch(self, queue: asyncio.Queue[object], item: object) -> tuple[list[RecordedEvent], object]:
        """The events queued after ``item`` (up to ``batch_size``), and the end marker
        or error that stopped the pump, if one came."""
        batch: list[RecordedEvent] = []
        deadline = time.monotonic() + self.linger_seconds
        while True:
            if not isinstance(item, RecordedEvent):
                return batch, item
            batch.append(item)
            if len(batch) >= self.batch_size:
                return batch, None
            remaining = deadline - time.monotonic()
            try:
                item = (
                    queue.get_nowait() if remaining <= 0 else await asyncio.wait_for(queue.get(), remaining)
                )
            except (asyncio.QueueEmpty, TimeoutError):
                return batch, None

    async def _handle(
        self, subscription: PersistentSubscription, batch: list[RecordedEvent], stop: asyncio.Event
    ) -> None:
        """Hand the batch to the handler and settle; what an outage kept is handed
        again after a back-off until it goes through or ``stop`` is set (then it stays
        unsettled: closing the subscription hands it back)."""
        pending = batch

        async def handle_and_settle() -> None:
            nonlocal pending
            try:
                with tracing.batch_span(f"consume {self.name}", pending):
                    outcome = await self.handler(pending)
            except Outage as held:  # the handler holds the whole batch
                self._outage.failed(held, detail="holding the events")
                raise
            await self._settle(subscription, outcome)
            pending = outcome.unavailable
            if pending:
                unavailable = Outage(outcome.unavailable_reason or "downstream unavailable")
                self._outage.failed(unavailable, detail=f"holding {len(pending)} events")
                raise unavailable
            self._outage.succeeded()

        await retry_until_stopped(
            handle_and_settle,
            stop,
            errors=(Outage,),
            log_retry=lambda _attempt, _seconds: None,  # the outage log says when it starts and ends
            wait=wait_exponential_jitter(multiplier=self.backoff[0], max=self.backoff[1]),
        )

    async def _settle(self, subscription: PersistentSubscription, outcome: Outcome) -> None:
        for event, reason in (*outcome.retry, *outcome.park):
            with event_context(event):
                log.warning(
                    "%s: %s@%d (%s) failed: %s", self.name, event.stream, event.revision, event.type, reason
                )
        await asyncio.gather(
            *(subscription.ack(event) for event in outcome.done),
            *(subscription.nack(event, NackAction.RETRY, reason[:500]) for event, reason in outcome.retry),
            *(subscription.nack(event, NackAction.PARK, reason[:500]) for event, reason in outcome.park),
            *(subscription.nack(event, NackAction.RETRY, HELD) for event in outcome.held),
        )
        if self.on_settled is not None:
            self.on_settled()
