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

Consuming is the shared :class:`~orderstream.application.batch_consumer.BatchConsumer`'s
(leases renewed while a batch waits, settling in one go). The trigger's handler
hands a batch to Temporal concurrently (at most ``max_in_flight`` at once), one
stream's events in order. An event is acked once Temporal accepted the start or
signal. When Temporal cannot be reached, that is an *outage*, not the event's
fault: the event and the rest of its stream are kept and handed over again after a
back-off for as long as Temporal stays away, without counting a delivery, so nothing
parks because Temporal was down. An event that cannot be decoded or handled is parked
at once, visible to operators, replayable and skippable
(``orderstream projections parked|replay-parked|skip saga-order-fulfilment``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from orderstream import tracing
from orderstream.application.batch_consumer import BatchConsumer, Outcome
from orderstream.domain import orders, payments
from orderstream.events import EventRegistry
from orderstream.events import registry as default_registry
from orderstream.eventstore.base import (
    EventFilter,
    EventMetadata,
    EventStore,
    PersistentSubscription,
    RecordedEvent,
    SubscriptionSettings,
)
from orderstream.logging_setup import event_context
from orderstream.metrics import Metrics
from orderstream.sagas.fulfilment.inputs import (
    CORRELATION_ID_ATTRIBUTE,
    DEFAULT_PAYMENT_DEADLINE_SECONDS,
    ORDER_ID_ATTRIBUTE,
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
        metrics: Metrics | None = None,
        eager_start: bool = False,
    ) -> None:
        """``settings`` are used only when the group does not exist yet; by
        default it starts at the beginning of the store. ``retry_backoff`` is
        (first, longest) delay before a failed event is nacked for retry.
        ``max_in_flight``: events handed to Temporal and not yet settled, at most.
        ``local_steps``: the sagas it starts run their steps as local activities.
        ``metrics``: counts the sagas it starts (not those it found started).
        ``eager_start``: a worker of ``task_queue`` polls through ``temporal_client`` in
        this process, so a start asks for the run's first workflow task in its answer
        (Temporal's eager workflow start: no poll and no matching round trip)."""
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.event_store = event_store
        self.client = temporal_client
        self.eager_start = eager_start
        self.eagerly_started = 0
        """Starts answered with the run's first workflow task (``eager_start``)."""
        self.task_queue = task_queue
        self.registry = registry
        self.group = group
        self.settings = settings or group_settings()
        self.payment_deadline_seconds = payment_deadline_seconds
        self.use_search_attributes = use_search_attributes
        self.retry_backoff = retry_backoff
        self.max_in_flight = max_in_flight
        self.local_steps = local_steps
        self.metrics = metrics

    # ------------------------------------------------------------------ running

    def consumer(self) -> BatchConsumer:
        return BatchConsumer(
            self.event_store,
            self.group,
            self.handle_batch,
            name=f"saga trigger {self.group}",
            batch_size=self.max_in_flight,
            ack_timeout_seconds=self.settings.ack_timeout_seconds,
            backoff=self.retry_backoff,
            prepare=self._prepare,
        )

    async def _prepare(self) -> bool:
        await self.event_store.ensure_subscription_group(self.group, self.settings)
        log.info(
            "saga trigger consuming group %s (task queue %s, %d in flight)",
            self.group,
            self.task_queue,
            self.max_in_flight,
        )
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Consume the group until ``stop`` is set. Unacked events go back to
        the group on the way out."""
        await self.consumer().run(stop)

    async def _consume(self, subscription: PersistentSubscription, stop: asyncio.Event | None = None) -> None:
        """Consume one connection (tests feed a subscription of their own)."""
        await self.consumer().consume(subscription, stop or asyncio.Event())

    async def handle_batch(self, batch: list[RecordedEvent]) -> Outcome:
        """Hand a batch to Temporal: streams concurrently (at most ``max_in_flight``
        calls at once), each stream's events in order, so a cancel never overtakes
        the start it cancels.

        One at a time, the trigger was bound by Temporal's round trip (about 0.1 s
        per start on the dev server): concurrent starts share the gRPC connection,
        and the acks that follow share the event store's group commit."""
        outcome = Outcome()
        slots = asyncio.Semaphore(self.max_in_flight)
        by_stream: dict[str, list[RecordedEvent]] = {}
        for event in batch:
            by_stream.setdefault(event.stream, []).append(event)

        async def deliver(events: list[RecordedEvent]) -> None:
            for index, event in enumerate(events):
                async with slots:
                    try:
                        with event_context(event):  # what is logged names the event's stream, position, ids
                            handled = await self._traced(event)
                    except TemporalUnavailable as exc:
                        outcome.unavailable.extend(events[index:])
                        outcome.unavailable_reason = str(exc)
                        return
                    except Exception as exc:
                        log.exception("%s@%d cannot be handled; parking it", event.type, event.position)
                        outcome.park.append((event, f"{type(exc).__name__}: {exc}"))
                        continue
                log.debug("%s@%d -> %s %s", event.type, event.position, handled.action, handled.workflow_id)
                outcome.done.append(event)

        async with asyncio.TaskGroup() as deliveries:
            for events in by_stream.values():
                deliveries.create_task(deliver(events))
        outcome.unavailable.sort(key=lambda e: e.position)
        return outcome

    # ----------------------------------------------------------------- handling

    async def _traced(self, event: RecordedEvent) -> Handled:
        """:meth:`handle` in a span continuing the trace of the request that appended
        ``event`` (the workflow start or signal joins the order's trace)."""
        with tracing.span_after(f"saga trigger {event.type}", event) as span:
            handled = await self.handle(event)
            if span is not None:
                span.set_attribute("orderstream.saga.action", handled.action)
            return handled

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
            handle = await self.client.start_workflow(
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
                request_eager_start=self.eager_start,
            )
            # The SDK marks a start that got its first workflow task in the answer (no public accessor).
            self.eagerly_started += bool(getattr(handle, "__temporal_eagerly_started", False))
        except WorkflowAlreadyStartedError:
            log.info("%s already started: OrderPlaced@%d redelivered", workflow_id, event.position)
            return Handled("already started", workflow_id)
        except RPCError as exc:
            raise TemporalUnavailable(f"start {workflow_id}: {exc.status.name}: {exc.message}") from exc
        log.info("started %s for OrderPlaced@%d", workflow_id, event.position)
        if self.metrics is not None:
            self.metrics.saga_started()
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
