"""The saga trigger under a burst: many starts in flight at once, each stream's
events still reaching Temporal in order, and the lag it reports draining to 0.
Against the real Temporal dev server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from temporalio.api.enums.v1 import EventType

from orderstream.domain import orders
from orderstream.eventstore.base import NackAction, RecordedEvent
from orderstream.sagas.fulfilment.trigger import SagaTrigger
from tests.sagas.conftest import SagaFactory, SagaHarness, eventually

pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session")]

BURST = 40


async def _place_many(saga: SagaHarness, count: int) -> list[str]:
    return list(await asyncio.gather(*(saga.place("tok_approve", ("MUG", 1)) for _ in range(count))))


async def _signals(saga: SagaHarness, order_id: str) -> list[str]:
    history = await saga.handle(order_id).fetch_history()
    return [
        event.workflow_execution_signaled_event_attributes.signal_name
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
    ]


async def test_a_burst_of_orders_all_get_a_saga_and_ship(make_saga: SagaFactory) -> None:
    saga = await make_saga(max_in_flight=8)  # fewer slots than orders: the bound is exercised
    await saga.product("MUG", BURST)

    order_ids = await _place_many(saga, BURST)

    outcomes = await asyncio.gather(*(saga.outcome(order_id) for order_id in order_ids))
    assert [outcome.status for outcome in outcomes] == ["shipped"] * BURST
    mug = await saga.stock("MUG")
    assert (mug.on_hand, mug.reserved) == (0, 0)


async def test_a_cancel_right_after_the_place_is_signalled_after_the_start(make_saga: SagaFactory) -> None:
    # No worker yet: the workflows cannot run, so each cancel must reach its
    # workflow as a signal. With a worker, a saga may meet the cancellation
    # itself (its next step is refused) and end before the trigger signals it;
    # then "workflow not running" is a right answer, and this test would race.
    saga = await make_saga(worker=False)
    await saga.product("MUG", 100)

    async def place_and_cancel() -> str:
        order_id = await saga.place("tok_approve", ("MUG", 1))
        await saga.container.use_cases.cancel_order(order_id, "changed my mind", saga.ctx)
        return order_id

    order_ids = await asyncio.gather(*(place_and_cancel() for _ in range(10)))

    for order_id in order_ids:
        await saga.started(order_id)

        async def signalled(order_id: str = order_id) -> bool:
            # Dropped as "workflow not found" had it overtaken the start.
            return await _signals(saga, order_id) == ["cancel"]

        await eventually(signalled, what=f"the cancel signal of {order_id}")

    saga.start_worker()
    for order_id in order_ids:
        assert (await saga.outcome(order_id)).status == "cancelled"
    assert (await saga.stock("MUG")).reserved == 0


class AllAtOnce:
    """A subscription that hands over every event it is given at once, later
    events of a stream before the earlier ones are settled: what KurrentDB's
    consumer may do with its prefetch buffer (the SQLite group never does)."""

    def __init__(self, events: Sequence[RecordedEvent]) -> None:
        self.events = list(events)
        self.acked: list[int] = []
        self.done = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[RecordedEvent]:
        for event in self.events:
            yield event
        await asyncio.Event().wait()  # a live subscription: nothing more for now

    async def ack(self, event: RecordedEvent) -> None:
        self.acked.append(event.position)
        if len(self.acked) == len(self.events):
            self.done.set()

    async def nack(self, event: RecordedEvent, action: NackAction, reason: str = "") -> None:
        raise AssertionError(f"{event.type}@{event.position} nacked ({action}): {reason}")

    async def keep_alive(self) -> None:
        pass

    async def close(self) -> None:
        pass


async def test_one_streams_events_reach_temporal_in_order_even_when_delivered_together(
    make_saga: SagaFactory,
) -> None:
    saga = await make_saga(worker=False)
    saga.trigger_stop.set()  # the harness's own trigger stands down: this test feeds one by hand
    await saga.product("MUG", 100)
    order_ids = []
    for _ in range(10):
        order_id = await saga.place("tok_approve", ("MUG", 1))
        await saga.container.use_cases.cancel_order(order_id, "changed my mind", saga.ctx)
        order_ids.append(order_id)
    events = [
        event
        for order_id in order_ids
        for event in await saga.stream(orders.stream_name(order_id))
        if event.type in ("OrderPlaced", "OrderCancelled")
    ]
    trigger = SagaTrigger(saga.container.event_store, saga.env.client, saga.task_queue, max_in_flight=64)
    subscription = AllAtOnce(events)

    consumer = asyncio.create_task(trigger._consume(subscription))
    try:
        await asyncio.wait_for(subscription.done.wait(), 30)
    finally:
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await consumer

    for order_id in order_ids:
        assert await _signals(saga, order_id) == ["cancel"]


async def test_saga_lag_is_reported_and_drains_to_zero(make_saga: SagaFactory) -> None:
    saga = await make_saga(worker=False)
    await saga.product("MUG", 10)
    order_ids = await _place_many(saga, 5)

    async def sagas() -> dict[str, int | None]:
        response = await saga.http.get("/ready")
        assert response.status_code == 200, response.text
        body: dict[str, int | None] = response.json()["sagas"]
        return body

    async def started_not_finished() -> bool:
        lag = await sagas()
        return lag["trigger_lag_events"] == 0 and lag["workflows_running"] == len(order_ids)

    await eventually(started_not_finished, what="every saga started and none finished")
    saga.start_worker()
    for order_id in order_ids:
        await saga.outcome(order_id)

    async def drained() -> bool:
        lag = await sagas()
        return lag["trigger_lag_events"] == 0 and lag["workflows_running"] == 0

    await eventually(drained, what="no saga running")
    metrics = (await saga.http.get("/metrics")).text
    assert "orderstream_saga_trigger_lag_events 0.0" in metrics
    assert "orderstream_saga_workflows_running 0.0" in metrics
    assert "orderstream_saga_trigger_parked 0.0" in metrics


async def test_the_trigger_beside_its_worker_starts_the_runs_eagerly(make_saga: SagaFactory) -> None:
    """With the worker polling through the trigger's client (serve: the first saga worker
    process runs the trigger), each start comes back with the run's first workflow task:
    no poll, no matching round trip on the Temporal server."""
    saga = await make_saga()
    await saga.product("MUG", 10)
    order_ids = await _place_many(saga, 3)
    for order_id in order_ids:
        assert (await saga.outcome(order_id)).status == "shipped"
    assert saga.trigger.eagerly_started == len(order_ids)
