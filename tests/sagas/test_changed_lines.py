"""The customer changes the order's lines (``PATCH /orders/{id}``) while the saga
reserves the lines of ``OrderPlaced``: the order refuses ``MarkStockReserved``
for stale lines, the saga reserves the current ones, and only those are charged,
committed and shipped. Against the real Temporal dev server.

Determinism: the order is placed while no worker polls the task queue. The
trigger starts the workflow at once with the lines of ``OrderPlaced``; the
lines change before a worker runs its first step, so the saga reserves stale
lines exactly as if the change had landed between its reserve and mark steps.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import msgspec
import pytest
from temporalio import activity
from temporalio.worker import Replayer

from orderstream.application.commands import CommandContext
from orderstream.application.use_cases import LineRequest
from orderstream.eventstore.base import RecordedEvent
from orderstream.sagas.fulfilment.activities import FulfilmentActivities
from orderstream.sagas.fulfilment.inputs import SAGA_ACTOR, OrderArgs, payment_id_for
from orderstream.sagas.fulfilment.worker import WORKFLOW_RUNNER
from orderstream.sagas.fulfilment.workflow import OrderFulfilment
from tests.sagas.conftest import WAIT, SagaFactory, SagaHarness, local_activities

pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session")]

PRICE = 1250  # every product's price in the harness


def _quantity(event: RecordedEvent) -> int:
    quantity: int = msgspec.json.decode(event.data)["quantity"]
    return quantity


async def _change_lines(saga: SagaHarness, order_id: str, *lines: tuple[str, int]) -> None:
    await saga.container.use_cases.change_order(
        order_id,
        shipping_address=None,
        lines=[LineRequest(sku, quantity) for sku, quantity in lines],
        context=saga.ctx,
    )


async def _assert_no_saga_event_twice(saga: SagaHarness, *streams: str) -> None:
    """Every command the saga sent appended its event(s) once: no idempotency key twice."""
    for stream in streams:
        keys = [
            (e.type, e.metadata.idempotency_key)
            for e in await saga.stream(stream)
            if e.metadata.actor == SAGA_ACTOR
        ]
        assert len(keys) == len(set(keys)), f"{stream}: {keys}"


async def _assert_replays(saga: SagaHarness, order_id: str) -> None:
    history = await saga.handle(order_id).fetch_history()
    result = await Replayer(workflows=[OrderFulfilment], workflow_runner=WORKFLOW_RUNNER).replay_workflow(
        history, raise_on_replay_failure=False
    )
    assert result.replay_failure is None, result.replay_failure


async def test_lines_changed_while_reserving_ship_the_new_lines(make_saga: SagaFactory) -> None:
    saga = await make_saga(worker=False)
    for sku in ("MUG", "TEA", "CUP"):
        await saga.product(sku, 10)
    order_id = await saga.place("tok_approve", ("MUG", 2), ("TEA", 1))
    await saga.started(order_id)  # with the lines of OrderPlaced as its input
    await _change_lines(saga, order_id, ("MUG", 3), ("CUP", 1))
    saga.start_worker()

    outcome = await saga.outcome(order_id)

    assert (outcome.status, outcome.error_type) == ("shipped", None)
    order = await saga.order(order_id)
    assert order.status == "shipped"
    assert [(line.sku, line.quantity) for line in order.lines] == [("MUG", 3), ("CUP", 1)]
    # Stock: committed for the new lines only; the dropped SKU is held no more.
    mug, tea, cup = await saga.stock("MUG"), await saga.stock("TEA"), await saga.stock("CUP")
    assert (mug.on_hand, mug.reserved) == (7, 0)
    assert (tea.on_hand, tea.reserved) == (10, 0)
    assert (cup.on_hand, cup.reserved) == (9, 0)
    mug_events = [e for e in await saga.stream("product-MUG") if e.type.startswith("Stock")]
    assert [(e.type, _quantity(e)) for e in mug_events] == [
        ("StockAdded", 10),
        ("StockReserved", 2),  # round 1: the stale line
        ("StockReserved", 3),  # round 2: resized to the current line
        ("StockCommitted", 3),
    ]
    assert await saga.types("product-TEA") == [
        "ProductRegistered",
        "StockAdded",
        "StockReserved",
        "StockReleased",
    ]
    assert await saga.types("product-CUP") == [
        "ProductRegistered",
        "StockAdded",
        "StockReserved",
        "StockCommitted",
    ]
    # Every order event once; the customer's change among them.
    assert await saga.types(f"order-{order_id}") == [
        "OrderPlaced",
        "OrderLinesChanged",
        "OrderStockReserved",
        "OrderPaymentAuthorised",
        "OrderConfirmed",
        "OrderShipped",
    ]
    # The payment is for the new total (4 x 12.50), not the one OrderPlaced had (3 x 12.50).
    pid = payment_id_for(order_id)
    assert await saga.types(f"payment-{pid}") == ["PaymentRequested", "PaymentAuthorised", "PaymentCaptured"]
    payment = await saga.payment(order_id)
    assert (payment.status, payment.amount) == ("captured", order.total)
    assert order.total is not None
    assert order.total.amount == 4 * PRICE
    await _assert_no_saga_event_twice(
        saga, f"order-{order_id}", f"payment-{pid}", *(f"product-{sku}" for sku in ("MUG", "TEA", "CUP"))
    )

    status = await saga.status(order_id)
    assert status["completed_steps"][:7] == [
        "reserve-stock/MUG",
        "reserve-stock/TEA",
        "load-order-lines/2",
        "reserve-stock/2/MUG",
        "reserve-stock/2/CUP",
        "mark-stock-reserved/2",
        "release-stock/TEA",
    ]
    assert status["completed_steps"][-3:] == ["capture-payment", "commit-stock/MUG", "commit-stock/CUP"]
    assert status["compensations"] == []
    # Round 1 ran as one activity (refused at its mark, with every line held);
    # round 2 runs one step at a time.
    steps = local_activities(await saga.handle(order_id).fetch_history())
    assert steps[:6] == [
        "reserve_and_mark_stock",
        "load_order_lines",
        "reserve_stock",
        "reserve_stock",
        "mark_stock_reserved",
        "release_stock",
    ]
    await _assert_replays(saga, order_id)


async def test_stock_short_for_stale_lines_only_is_no_rejection(make_saga: SagaFactory) -> None:
    saga = await make_saga(worker=False)
    await saga.product("MUG", 10)
    await saga.product("TEA", 1)
    order_id = await saga.place("tok_approve", ("MUG", 2), ("TEA", 3))
    await saga.started(order_id)
    await _change_lines(saga, order_id, ("MUG", 2), ("TEA", 1))  # the customer takes what there is
    saga.start_worker()

    outcome = await saga.outcome(order_id)

    assert outcome.status == "shipped"
    mug, tea = await saga.stock("MUG"), await saga.stock("TEA")
    assert (mug.on_hand, mug.reserved, tea.on_hand, tea.reserved) == (8, 0, 0, 0)
    assert await saga.counts("product-MUG") == Counter(
        {"ProductRegistered": 1, "StockAdded": 1, "StockReserved": 1, "StockCommitted": 1}
    )
    status = await saga.status(order_id)
    assert status["completed_steps"][:4] == [
        "reserve-stock/MUG",  # then TEA x 3 is short: the order's lines are read again
        "load-order-lines/2",
        "reserve-stock/2/TEA",  # MUG x 2 is held already
        "mark-stock-reserved/2",
    ]
    steps = local_activities(await saga.handle(order_id).fetch_history())
    assert steps[:4] == ["reserve_and_mark_stock", "load_order_lines", "reserve_stock", "mark_stock_reserved"]
    await _assert_replays(saga, order_id)


class CustomerKeepsChangingTheLines(FulfilmentActivities):
    """Test double: the customer changes the MUG quantity just before every mark."""

    changes = 0

    @activity.defn(name="mark_stock_reserved")
    async def mark_stock_reserved(self, args: OrderArgs) -> None:
        self.changes += 1
        await self.use_cases.change_order(
            args.order_id,
            shipping_address=None,
            lines=[LineRequest("MUG", 1 + self.changes)],
            context=CommandContext(actor="test"),
        )
        await super().mark_stock_reserved(args)


async def test_lines_that_keep_changing_are_given_up_on_and_compensated(make_saga: SagaFactory) -> None:
    saga = await make_saga(worker=False)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_approve", ("MUG", 1))
    acts = CustomerKeepsChangingTheLines(saga.container.use_cases, saga.gateway)
    worker = saga.worker_with(acts)
    async with worker:
        outcome = await asyncio.wait_for(saga.outcome(order_id), WAIT)

    assert acts.changes == 3
    assert (outcome.status, outcome.error_type) == ("compensated", None)
    assert outcome.reason == "the order's lines kept changing while stock was reserved (3 attempts)"
    assert outcome.compensations == ["release-stock/MUG: released", "close-order: cancelled"]
    order = await saga.order(order_id)
    assert (order.status, order.cancel_reason) == ("cancelled", outcome.reason)
    mug = await saga.stock("MUG")
    assert (mug.on_hand, mug.reserved) == (10, 0)
    mug_events = [e for e in await saga.stream("product-MUG") if e.type in ("StockReserved", "StockReleased")]
    assert [(e.type, _quantity(e)) for e in mug_events] == [
        ("StockReserved", 1),
        ("StockReserved", 2),
        ("StockReserved", 3),
        ("StockReleased", 3),
    ]
    assert await saga.types(f"payment-{payment_id_for(order_id)}") == []  # never asked for money
    await _assert_no_saga_event_twice(saga, f"order-{order_id}", "product-MUG")
