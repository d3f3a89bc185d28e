"""The saga trigger: turns events into Temporal workflow starts and signals.

It consumes the persistent subscription group ``saga-order-fulfilment``
(categories ``order`` and ``payment``), so its progress survives restarts and
several trigger processes can share the work:

=====================================  ==================================================
event                                  Temporal
=====================================  ==================================================
``OrderPlaced``                        start ``OrderFulfilment``, id ``order-fulfilment-{order_id}``
``OrderCancelled`` (not by the saga)   signal ``cancel(reason)``
``PaymentAuthorised`` / ``Declined``   signal ``payment_result("authorised" | "declined")``
(not by the saga: the webhook's)
=====================================  ==================================================

The event store is the source of truth: the webhook route appends the
payment's result through the payment decider, and this trigger forwards it.

Exactly-once start: the workflow id is derived from the order id and started
with ``REJECT_DUPLICATE``, so a redelivered ``OrderPlaced`` (crash before the
ack, retry after a timeout) finds the workflow already there; that counts as
success. A signal to a workflow that has already finished is dropped (the saga
is over; the order decider already refused whatever the signal was about).

An event is acked once Temporal accepted the start or signal. When Temporal
cannot be reached it is nacked for retry after a back-off; after the group's
``max_retry`` deliveries it is parked, visible to operators and replayable
(``orderstream`` CLI). An event that cannot be decoded is parked at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass

from temporalio.client import Client
from temporalio.common import (
    SearchAttributeKey,
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from orderstream.domain import orders, payments
from orderstream.events import EventRegistry
from orderstream.events import registry as default_registry
from orderstream.eventstore.base import (
    EventFilter,
    EventMetadata,
    EventStore,
    NackAction,
    PersistentSubscription,
    RecordedEvent,
    SubscriptionSettings,
)
from orderstream.logging_setup import event_context
from workflows.order_fulfilment.inputs import (
    DEFAULT_PAYMENT_DEADLINE_SECONDS,
    SAGA_ACTOR,
    SIGNAL_CANCEL,
    SIGNAL_PAYMENT_RESULT,
    WORKFLOW_TYPE,
    Amount,
    FulfilmentInput,
    Line,
    payment_id_for,
    workflow_id_for,
)

log = logging.getLogger("orderstream.saga")

GROUP = "saga-order-fulfilment"
HANDLED_TYPES = ("OrderPlaced", "OrderCancelled", "PaymentAuthorised", "PaymentDeclined")
DEFAULT_MAX_IN_FLIGHT = 64
"""Starts and signals waiting on Temporal at once (``ORDERSTREAM_SAGA_IN_FLIGHT``).
Measured on the dev server (docs/sagas.md): past a few dozen, more only queue there."""

ORDER_ID_ATTRIBUTE = SearchAttributeKey.for_keyword("OrderId")
CORRELATION_ID_ATTRIBUTE = SearchAttributeKey.for_keyword("CorrelationId")
SEARCH_ATTRIBUTES = (ORDER_ID_ATTRIBUTE, CORRELATION_ID_ATTRIBUTE)
"""Custom search attributes the trigger sets when ``use_search_attributes``:
the dev server registers them at start (see ``workflows.runtime``); a real
cluster needs ``temporal operator search-attribute create`` once."""


def group_settings(*, from_position: int | None = None, max_retry: int = 10) -> SubscriptionSettings:
    return SubscriptionSettings(
        filter=EventFilter(categories=(orders.CATEGORY, payments.CATEGORY), types=HANDLED_TYPES),
        from_position=from_position,
        max_retry=max_retry,
    )


class TemporalUnavailable(Exception):
    """Temporal refused or could not take the start or signal: retry later."""


@dataclass(frozen=True)
class Handled:
    """What the trigger did with one event (returned for tests and logs)."""

    action: str
    workflow_id: str | None = None


class SagaTrigger:
    def __init__(
        self,
        event_store: EventStore,
        temporal_client: Client,
        task_queue: str,
        *,
        registry: EventRegistry = default_registry,
        group: str = GROUP,
        settings: SubscriptionSettings | None = None,
        payment_deadline_seconds: float = DEFAULT_PAYMENT_DEADLINE_SECONDS,
        use_search_attributes: bool = False,
        retry_backoff: tuple[float, float] = (0.2, 30.0),
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        local_steps: bool = True,
    ) -> None:
        """``settings`` are used only when the group does not exist yet; by
        default it starts at the beginning of the store. ``retry_backoff`` is
        (first, longest) delay before a failed event is nacked for retry.
        ``max_in_flight``: events handed to Temporal and not yet settled, at most.
        ``local_steps``: the sagas it starts run their steps as local activities."""
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.event_store = event_store
        self.client = temporal_client
        self.task_queue = task_queue
        self.registry = registry
        self.group = group
        self.settings = settings or group_settings()
        self.payment_deadline_seconds = payment_deadline_seconds
        self.use_search_attributes = use_search_attributes
        self.retry_backoff = retry_backoff
        self.max_in_flight = max_in_flight
        self.local_steps = local_steps
        self._failures = 0
        self._resume_at = 0.0

    # ------------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        """Consume the group until ``stop`` is set. Unacked events go back to
        the group on the way out."""
        await self.event_store.ensure_subscription_group(self.group, self.settings)
        subscription = await self.event_store.connect_subscription_group(self.group)
        consumer = asyncio.create_task(self._consume(subscription), name=f"{self.group}-consumer")
        stopper = asyncio.create_task(stop.wait(), name=f"{self.group}-stop")
        try:
            done, _ = await asyncio.wait({consumer, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if consumer in done:
                consumer.result()  # the subscription ended: raise its error, if any
        finally:
            for task in (consumer, stopper):
                task.cancel()
            for task in (consumer, stopper):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await subscription.close()

    async def _consume(self, subscription: PersistentSubscription) -> None:
        """Deliver events concurrently: at most ``max_in_flight`` starts and
        signals wait on Temporal at once, while one stream's events still reach
        Temporal in order (each waits for the one before it of its stream).

        One at a time, the trigger was bound by Temporal's round trip (about
        0.1 s per start on the dev server): a few starts per second, whatever
        the worker could do. Concurrent starts share the gRPC connection, and
        the acks that follow share the event store's group commit.
        """
        log.info(
            "saga trigger consuming group %s (task queue %s, %d in flight)",
            self.group,
            self.task_queue,
            self.max_in_flight,
        )
        slots = asyncio.Semaphore(self.max_in_flight)
        last_of_stream: dict[str, asyncio.Task[None]] = {}
        async with asyncio.TaskGroup() as deliveries:
            async for event in subscription:
                await slots.acquire()
                await self._backing_off()
                before = last_of_stream.get(event.stream)
                task = deliveries.create_task(self._deliver(subscription, event, before, slots))
                last_of_stream[event.stream] = task
                task.add_done_callback(functools.partial(_forget, last_of_stream, event.stream))

    async def _deliver(
        self,
        subscription: PersistentSubscription,
        event: RecordedEvent,
        before: asyncio.Task[None] | None,
        slots: asyncio.Semaphore,
    ) -> None:
        """Hand one event to Temporal after its stream's previous one, then settle it."""
        try:
            if before is not None:
                await asyncio.wait([before])  # its outcome is its own business
            with event_context(event):  # what is logged names the event's stream, position, ids
                await self._deliver_one(subscription, event)
        finally:
            slots.release()

    async def _deliver_one(self, subscription: PersistentSubscription, event: RecordedEvent) -> None:
        try:
            handled = await self.handle(event)
        except TemporalUnavailable as exc:
            delay = self._failed()
            log.warning("%s@%d: %s; retrying in %.1f s", event.type, event.position, exc, delay)
            await asyncio.sleep(delay)
            await subscription.nack(event, NackAction.RETRY, str(exc))
            return
        except Exception as exc:
            log.exception("%s@%d cannot be handled; parking it", event.type, event.position)
            await subscription.nack(event, NackAction.PARK, f"{type(exc).__name__}: {exc}")
            return
        self._failures = 0
        log.debug("%s@%d -> %s %s", event.type, event.position, handled.action, handled.workflow_id)
        await subscription.ack(event)

    def _failed(self) -> float:
        """Count a failure and return the back-off before its retry. The whole
        trigger backs off too (see :meth:`_backing_off`): with Temporal down,
        taking more events would only burn their deliveries."""
        self._failures += 1
        delay = min(self.retry_backoff[1], self.retry_backoff[0] * 2.0 ** (self._failures - 1))
        self._resume_at = max(self._resume_at, time.monotonic() + delay)
        return delay

    async def _backing_off(self) -> None:
        wait = self._resume_at - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    # ----------------------------------------------------------------- handling

    async def handle(self, event: RecordedEvent) -> Handled:
        """Start or signal for one event. Raises :class:`TemporalUnavailable`
        when it should be retried."""
        metadata = event.metadata
        if event.type == "OrderPlaced":
            return await self._start(event, self.registry.decode(event), metadata)
        if metadata.actor == SAGA_ACTOR:
            return Handled("ignored: appended by the saga itself")
        if event.type == "OrderCancelled":
            cancelled: orders.OrderCancelled = self.registry.decode(event)
            return await self._signal(workflow_id_for(cancelled.order_id), SIGNAL_CANCEL, cancelled.reason)
        if event.type in ("PaymentAuthorised", "PaymentDeclined"):
            result: payments.PaymentAuthorised | payments.PaymentDeclined = self.registry.decode(event)
            status = "authorised" if event.type == "PaymentAuthorised" else "declined"
            return await self._signal(workflow_id_for(result.order_id), SIGNAL_PAYMENT_RESULT, status)
        return Handled(f"ignored: {event.type}")

    def input_for(
        self, event: RecordedEvent, placed: orders.OrderPlaced, metadata: EventMetadata
    ) -> FulfilmentInput:
        return FulfilmentInput(
            order_id=placed.order_id,
            payment_id=payment_id_for(placed.order_id),
            lines=[Line(line.sku, line.quantity) for line in placed.lines],
            amount=Amount(placed.total.amount, placed.total.currency),
            payment_method_id=placed.payment_method_id,
            correlation_id=metadata.correlation_id or str(event.id),
            causation_id=str(event.id),
            payment_deadline_seconds=self.payment_deadline_seconds,
            local_steps=self.local_steps,
        )

    async def _start(
        self, event: RecordedEvent, placed: orders.OrderPlaced, metadata: EventMetadata
    ) -> Handled:
        inp = self.input_for(event, placed, metadata)
        workflow_id = workflow_id_for(placed.order_id)
        search_attributes = None
        if self.use_search_attributes:
            search_attributes = TypedSearchAttributes(
                [
                    SearchAttributePair(ORDER_ID_ATTRIBUTE, placed.order_id),
                    SearchAttributePair(CORRELATION_ID_ATTRIBUTE, inp.correlation_id),
                ]
            )
        try:
            await self.client.start_workflow(
                WORKFLOW_TYPE,
                inp,
                id=workflow_id,
                task_queue=self.task_queue,
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
                id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
                memo={
                    "order_id": placed.order_id,
                    "payment_id": inp.payment_id,
                    "correlation_id": inp.correlation_id,
                    "causation_id": inp.causation_id,
                },
                search_attributes=search_attributes,
                static_summary=f"Fulfil order {placed.order_id}",
            )
        except WorkflowAlreadyStartedError:
            log.info("%s already started: OrderPlaced@%d redelivered", workflow_id, event.position)
            return Handled("already started", workflow_id)
        except RPCError as exc:
            raise TemporalUnavailable(f"start {workflow_id}: {exc.status.name}: {exc.message}") from exc
        log.info("started %s for OrderPlaced@%d", workflow_id, event.position)
        return Handled("started", workflow_id)

    async def _signal(self, workflow_id: str, signal: str, arg: str) -> Handled:
        try:
            await self.client.get_workflow_handle(workflow_id).signal(signal, arg)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                log.info("%s: no running workflow for signal %s (%s)", workflow_id, signal, exc.message)
                return Handled(f"dropped {signal}: workflow not running", workflow_id)
            raise TemporalUnavailable(
                f"signal {signal} to {workflow_id}: {exc.status.name}: {exc.message}"
            ) from exc
        return Handled(f"signalled {signal}", workflow_id)


def _forget(last_of_stream: dict[str, asyncio.Task[None]], stream: str, done: asyncio.Task[None]) -> None:
    """Drop a finished delivery from the per-stream chain unless a later one replaced it."""
    if last_of_stream.get(stream) is done:
        del last_of_stream[stream]
