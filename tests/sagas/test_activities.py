"""The activities without Temporal: idempotent retries and final errors."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from temporalio.exceptions import ApplicationError

from orderstream.application.commands import CommandContext, CommandHandler
from orderstream.application.use_cases import LineRequest, UseCases
from orderstream.domain import inventory
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.sqlite import SqliteEventStore
from orderstream.sagas.fulfilment.activities import FulfilmentActivities
from orderstream.sagas.fulfilment.inputs import (
    Amount,
    Line,
    OrderArgs,
    OrderLines,
    PaymentArgs,
    ReserveSteps,
    SettleSteps,
    ShipSteps,
    StepRef,
    StockArgs,
    payment_id_for,
)
from orderstream.sagas.fulfilment.payment_gateway import PaymentGatewayUnavailable, SandboxPaymentGateway
from tests.sagas.conftest import ADDRESS


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    store = await SqliteEventStore.open(tmp_path / "events.db")
    yield store
    await store.close()


@pytest_asyncio.fixture
async def acts(store: SqliteEventStore) -> FulfilmentActivities:
    use_cases = UseCases(CommandHandler(store, registry), vault=SandboxPaymentGateway())
    ctx = CommandContext(actor="test")
    await use_cases.register_product("MUG", "mug", Money(500, "EUR"), ctx)
    await use_cases.add_stock("MUG", 3, ctx)
    return FulfilmentActivities(use_cases, SandboxPaymentGateway())


async def _order(acts: FulfilmentActivities) -> str:
    result = await acts.use_cases.place_order(
        customer_id="c",
        lines=[LineRequest("MUG", 2)],
        shipping_address=ADDRESS,
        payment_token="tok_approve",
        context=CommandContext(actor="test"),
    )
    return result.state.order_id


def _ref(step: str) -> StepRef:
    return StepRef("order-fulfilment-x", step, "corr-1", "cause-1")


async def test_a_retried_step_appends_nothing_twice(
    acts: FulfilmentActivities, store: SqliteEventStore
) -> None:
    order_id = await _order(acts)
    pid = payment_id_for(order_id)
    amount = Amount(1000, "EUR")
    card = await acts.gateway.store("tok_approve")
    for _attempt in range(3):  # as if the worker died before reporting each completion
        await acts.reserve_stock(StockArgs(_ref("reserve-stock/MUG"), order_id, "MUG", quantity=2))
        await acts.mark_stock_reserved(OrderArgs(_ref("mark-stock-reserved"), order_id, [Line("MUG", 2)]))
        await acts.request_payment(PaymentArgs(_ref("request-payment"), pid, order_id, amount, card))
        answer = await acts.authorise_payment(
            PaymentArgs(_ref("authorise-payment"), pid, order_id, amount, card)
        )
        assert answer.status == "approved"
        await acts.capture_payment(PaymentArgs(_ref("capture-payment"), pid, order_id, amount))

    product = Counter(e.type for e in await store.read_stream("product-MUG"))
    assert product["StockReserved"] == 1
    order = [e.type for e in await store.read_stream(f"order-{order_id}")]
    assert order == ["OrderPlaced", "OrderStockReserved"]
    payment = [e.type for e in await store.read_stream(f"payment-{pid}")]
    assert payment == ["PaymentRequested", "PaymentAuthorised", "PaymentCaptured"]
    meta = (await store.read_stream(f"payment-{pid}"))[1].metadata
    assert meta.idempotency_key == "order-fulfilment-x/authorise-payment"
    assert (meta.correlation_id, meta.causation_id) == ("corr-1", "cause-1")


async def test_insufficient_stock_is_a_final_error(acts: FulfilmentActivities) -> None:
    order_id = await _order(acts)
    with pytest.raises(ApplicationError) as caught:
        await acts.reserve_stock(StockArgs(_ref("reserve-stock/MUG"), order_id, "MUG", quantity=4))
    assert caught.value.type == "InsufficientStock"
    assert caught.value.non_retryable
    assert caught.value.details[0] == {
        "code": "insufficient-stock",
        "sku": "MUG",
        "requested": 4,
        "available": 3,
    }


async def test_illegal_transition_is_a_final_error_with_the_status(acts: FulfilmentActivities) -> None:
    order_id = await _order(acts)
    with pytest.raises(ApplicationError) as caught:
        await acts.confirm_order(OrderArgs(_ref("confirm-order"), order_id))
    assert caught.value.type == "IllegalTransition"
    assert caught.value.non_retryable
    assert caught.value.details[0]["status"] == "placed"


async def test_compensations_are_no_ops_when_nothing_is_held(acts: FulfilmentActivities) -> None:
    order_id = await _order(acts)
    pid = payment_id_for(order_id)
    released = await acts.release_stock(StockArgs(_ref("release-stock/MUG"), order_id, "MUG", reason="r"))
    assert released == "nothing reserved"
    voided = await acts.void_payment(
        PaymentArgs(_ref("void-payment"), pid, order_id, Amount(1, "EUR"), reason="r")
    )
    assert voided == "no payment requested"
    unknown = await acts.release_stock(StockArgs(_ref("release-stock/NOPE"), order_id, "NOPE", reason="r"))
    assert unknown == "nothing reserved (unknown product)"


async def test_a_replayed_release_says_it_released(acts: FulfilmentActivities) -> None:
    """A release retried after its event was appended (lost completion) appends
    nothing again, and its note still says the stock was released."""
    order_id = await _order(acts)
    await acts.reserve_stock(StockArgs(_ref("reserve-stock/MUG"), order_id, "MUG", quantity=2))
    args = StockArgs(_ref("release-stock/MUG"), order_id, "MUG", reason="declined")

    first = await acts.release_stock(args)
    again = await acts.release_stock(args)

    assert (first, again) == ("released", "released (replayed)")
    events = await acts.use_cases.handler.event_store.read_stream(inventory.stream_name("MUG"))
    assert Counter(e.type for e in events)["StockReleased"] == 1
    stock = await acts.use_cases.handler.load(inventory.decider, inventory.stream_name("MUG"))
    assert stock.state.reserved == 0
    # A later release under another key finds nothing held.
    other = await acts.release_stock(StockArgs(_ref("release-stock/2/MUG"), order_id, "MUG", reason="r"))
    assert other == "nothing reserved"


async def test_closing_an_order_someone_else_closed_is_fine(acts: FulfilmentActivities) -> None:
    order_id = await _order(acts)
    await acts.use_cases.cancel_order(order_id, "customer", CommandContext(actor="test"))
    note = await acts.cancel_order(OrderArgs(_ref("cancel-order"), order_id, reason="saga"))
    assert note == "already cancelled"


async def test_load_order_lines_reads_the_current_lines_and_total(acts: FulfilmentActivities) -> None:
    order_id = await _order(acts)
    await acts.use_cases.register_product("CUP", "cup", Money(300, "EUR"), CommandContext(actor="test"))
    args = OrderArgs(_ref("load-order-lines/2"), order_id)
    assert await acts.load_order_lines(args) == OrderLines([Line("MUG", 2)], Amount(1000, "EUR"))

    await acts.use_cases.change_order(
        order_id,
        shipping_address=None,
        lines=[LineRequest("MUG", 1), LineRequest("CUP", 2)],
        context=CommandContext(actor="test"),
    )
    assert await acts.load_order_lines(args) == OrderLines(
        [Line("MUG", 1), Line("CUP", 2)], Amount(1100, "EUR")
    )


async def test_loading_the_lines_of_a_cancelled_order_is_a_final_illegal_transition(
    acts: FulfilmentActivities,
) -> None:
    order_id = await _order(acts)
    await acts.use_cases.cancel_order(order_id, "customer", CommandContext(actor="test"))
    with pytest.raises(ApplicationError) as caught:
        await acts.load_order_lines(OrderArgs(_ref("load-order-lines/2"), order_id))
    assert (caught.value.type, caught.value.non_retryable) == ("IllegalTransition", True)
    assert caught.value.details[0]["status"] == "cancelled"


async def test_marking_stale_lines_is_a_final_lines_changed_error(
    acts: FulfilmentActivities, store: SqliteEventStore
) -> None:
    order_id = await _order(acts)
    await acts.use_cases.change_order(
        order_id, shipping_address=None, lines=[LineRequest("MUG", 3)], context=CommandContext(actor="test")
    )
    with pytest.raises(ApplicationError) as caught:
        await acts.mark_stock_reserved(OrderArgs(_ref("mark-stock-reserved"), order_id, [Line("MUG", 2)]))
    assert (caught.value.type, caught.value.non_retryable) == ("LinesChanged", True)
    assert caught.value.details[0] == {
        "code": "lines-changed",
        "reserved": [{"sku": "MUG", "quantity": 2}],
        "current": [{"sku": "MUG", "quantity": 3}],
    }
    # The next round, under its own key, is accepted; the refused one appended nothing.
    await acts.mark_stock_reserved(OrderArgs(_ref("mark-stock-reserved/2"), order_id, [Line("MUG", 3)]))
    order = [e.type for e in await store.read_stream(f"order-{order_id}")]
    assert order == ["OrderPlaced", "OrderLinesChanged", "OrderStockReserved"]


async def test_each_round_resizes_the_reservation_under_its_own_key(
    acts: FulfilmentActivities, store: SqliteEventStore
) -> None:
    order_id = await _order(acts)
    for _attempt in range(2):  # every activity retried once after it took effect
        await acts.reserve_stock(StockArgs(_ref("reserve-stock/MUG"), order_id, "MUG", quantity=2))
    for _attempt in range(2):
        await acts.reserve_stock(StockArgs(_ref("reserve-stock/2/MUG"), order_id, "MUG", quantity=3))

    product = (await acts.use_cases.handler.load(inventory.decider, inventory.stream_name("MUG"))).state
    assert (product.on_hand, product.reserved) == (3, 3)
    reserved = [e for e in await store.read_stream("product-MUG") if e.type == "StockReserved"]
    assert [e.metadata.idempotency_key for e in reserved] == [
        "order-fulfilment-x/reserve-stock/MUG",
        "order-fulfilment-x/reserve-stock/2/MUG",
    ]


# Joined steps (patch joined-reserve-and-ship): a failure names its step.


async def test_joined_reservation_fails_naming_its_step_and_a_retry_replays_the_rest(
    acts: FulfilmentActivities, store: SqliteEventStore
) -> None:
    ctx = CommandContext(actor="test")
    await acts.use_cases.register_product("TEA", "tea", Money(300, "EUR"), ctx)
    await acts.use_cases.add_stock("TEA", 1, ctx)
    order_id = (
        await acts.use_cases.place_order(
            customer_id="c",
            lines=[LineRequest("MUG", 2), LineRequest("TEA", 1)],
            shipping_address=ADDRESS,
            payment_token="tok_approve",
            context=ctx,
        )
    ).state.order_id
    lines = [Line("MUG", 2), Line("TEA", 1)]
    mark = OrderArgs(_ref("mark-stock-reserved"), order_id, lines)

    def steps(tea: int) -> ReserveSteps:
        mug = StockArgs(_ref("reserve-stock/MUG"), order_id, "MUG", quantity=2)
        return ReserveSteps([mug, StockArgs(_ref("reserve-stock/TEA"), order_id, "TEA", quantity=tea)], mark)

    with pytest.raises(ApplicationError) as caught:
        await acts.reserve_and_mark_stock(steps(tea=2))
    assert (caught.value.type, caught.value.non_retryable) == ("InsufficientStock", True)
    assert caught.value.details[0] == {
        "code": "insufficient-stock",
        "sku": "TEA",
        "requested": 2,
        "available": 1,
        "step": "reserve-stock/TEA",
    }

    for _attempt in range(2):  # a retry replays every step already done
        await acts.reserve_and_mark_stock(steps(tea=1))
    assert Counter(e.type for e in await store.read_stream("product-MUG"))["StockReserved"] == 1
    order = [e.type for e in await store.read_stream(f"order-{order_id}")]
    assert order == ["OrderPlaced", "OrderStockReserved"]


async def test_joined_reservation_refused_at_the_mark_says_so(acts: FulfilmentActivities) -> None:
    order_id = await _order(acts)
    await acts.use_cases.change_order(
        order_id, shipping_address=None, lines=[LineRequest("MUG", 3)], context=CommandContext(actor="test")
    )
    reserve = StockArgs(_ref("reserve-stock/MUG"), order_id, "MUG", quantity=2)
    mark = OrderArgs(_ref("mark-stock-reserved"), order_id, [Line("MUG", 2)])
    with pytest.raises(ApplicationError) as caught:
        await acts.reserve_and_mark_stock(ReserveSteps([reserve], mark))
    assert (caught.value.type, caught.value.non_retryable) == ("LinesChanged", True)
    assert caught.value.details[0]["step"] == "mark-stock-reserved"
    assert caught.value.details[0]["current"] == [{"sku": "MUG", "quantity": 3}]


class CaptureUnavailable(SandboxPaymentGateway):
    async def capture(self, payment_id: str, amount: Money) -> None:
        raise PaymentGatewayUnavailable("capture timed out")


async def test_joined_ship_and_settle_says_whether_it_shipped(acts: FulfilmentActivities) -> None:
    order_id = await _order(acts)
    pid = payment_id_for(order_id)
    amount = Amount(1000, "EUR")
    ship = OrderArgs(_ref("ship-order"), order_id, tracking_number="T1")
    settle = SettleSteps(
        PaymentArgs(_ref("capture-payment"), pid, order_id, amount),
        [StockArgs(_ref("commit-stock/MUG"), order_id, "MUG")],
    )
    # Not shipped: the order is not confirmed (a final error, as ship_order's own).
    with pytest.raises(ApplicationError) as caught:
        await acts.ship_and_settle_order(ShipSteps(ship, settle))
    assert (caught.value.type, caught.value.non_retryable) == ("IllegalTransition", True)
    details = caught.value.details[0]
    assert (details["status"], details["step"], details["shipped"]) == ("placed", "ship-order", False)

    reserve = StockArgs(_ref("reserve-stock/MUG"), order_id, "MUG", quantity=2)
    await acts.reserve_and_mark_stock(
        ReserveSteps([reserve], OrderArgs(_ref("mark-stock-reserved"), order_id, [Line("MUG", 2)]))
    )
    card = await acts.gateway.store("tok_approve")
    pay = PaymentArgs(_ref("request-payment"), pid, order_id, amount, card)
    await acts.request_payment(pay)
    await acts.authorise_payment(PaymentArgs(_ref("authorise-payment"), pid, order_id, amount, card))
    await acts.mark_payment_authorised(OrderArgs(_ref("mark-payment-authorised"), order_id, payment_id=pid))
    await acts.confirm_order(OrderArgs(_ref("confirm-order"), order_id))
    # Shipped, then the gateway is down: a transient error (retryable), saying shipped.
    flaky = FulfilmentActivities(acts.use_cases, CaptureUnavailable())
    with pytest.raises(ApplicationError) as caught:
        await flaky.ship_and_settle_order(ShipSteps(ship, settle))
    assert (caught.value.type, caught.value.non_retryable) == ("PaymentGatewayUnavailable", False)
    assert caught.value.message == "capture timed out"
    assert caught.value.details[0] == {"step": "capture-payment", "shipped": True}
    assert await acts.load_order_status(ship) == "shipped"
    check = OrderArgs(_ref("check-shipped"), order_id, reason="ship-order failed: no answer")
    assert await acts.cancel_unless_shipped(check) == "shipped"  # and nothing cancelled
    await acts.ship_and_settle_order(ShipSteps(ship, settle))  # the retry replays ship-order
    order = [e.type for e in await acts.use_cases.handler.event_store.read_stream(f"order-{order_id}")]
    assert order.count("OrderShipped") == 1


async def _confirmed(acts: FulfilmentActivities) -> str:
    """An order the saga has taken up to ``confirm-order``: ``ship-order`` is next."""
    order_id = await _order(acts)
    pid = payment_id_for(order_id)
    amount = Amount(1000, "EUR")
    card = await acts.gateway.store("tok_approve")
    await acts.reserve_stock(StockArgs(_ref("reserve-stock/MUG"), order_id, "MUG", quantity=2))
    await acts.mark_stock_reserved(OrderArgs(_ref("mark-stock-reserved"), order_id, [Line("MUG", 2)]))
    await acts.request_payment(PaymentArgs(_ref("request-payment"), pid, order_id, amount, card))
    await acts.authorise_payment(PaymentArgs(_ref("authorise-payment"), pid, order_id, amount, card))
    await acts.mark_payment_authorised(OrderArgs(_ref("mark-payment-authorised"), order_id, payment_id=pid))
    await acts.confirm_order(OrderArgs(_ref("confirm-order"), order_id))
    return order_id


async def test_cancel_unless_shipped_closes_the_order_to_a_late_shipment(acts: FulfilmentActivities) -> None:
    """The fenced ``check-shipped``: once it answered "not shipped", a ``ShipOrder``
    still on its way is refused, and says that this saga's check closed the order (a
    run re-executing after the check must not take it for the customer's doing); a
    retry of the check answers the same."""
    order_id = await _confirmed(acts)
    check = OrderArgs(_ref("check-shipped"), order_id, reason="ship-order failed: no answer")
    assert await acts.cancel_unless_shipped(check) == "cancelled"
    assert await acts.cancel_unless_shipped(check) == "cancelled"  # its idempotency record
    with pytest.raises(ApplicationError) as late:
        await acts.ship_order(OrderArgs(_ref("ship-order"), order_id, tracking_number="T1"))
    assert (late.value.type, late.value.details[0]["status"]) == ("IllegalTransition", "cancelled")
    assert late.value.details[0]["cancelled_by"] == "check-shipped"
    events = [e.type for e in await acts.use_cases.handler.event_store.read_stream(f"order-{order_id}")]
    assert events.count("OrderCancelled") == 1
    assert "OrderShipped" not in events
    # An order someone else closed first stays as it is.
    other = await _order(acts)
    await acts.reject_order(OrderArgs(_ref("reject-order"), other, reason="short"))
    assert await acts.cancel_unless_shipped(OrderArgs(_ref("check-shipped"), other)) == "rejected"


async def test_the_check_is_recognised_by_its_event_when_its_record_is_missing(
    acts: FulfilmentActivities, store: SqliteEventStore
) -> None:
    """KurrentDB writes the idempotency record after the events, apart: a crash between
    the two leaves the check's ``OrderCancelled`` without a record. (Made here by
    deleting the SQLite row.) The refusal still names the check, from the metadata."""
    order_id = await _confirmed(acts)
    check = OrderArgs(_ref("check-shipped"), order_id, reason="ship-order failed: no answer")
    assert await acts.cancel_unless_shipped(check) == "cancelled"
    key = check.ref.idempotency_key
    removed = await store._submit(
        lambda conn: conn.execute("DELETE FROM idempotency WHERE key = ?", (key,)).rowcount
    )
    assert removed == 1
    with pytest.raises(ApplicationError) as refused:
        await acts.ship_order(OrderArgs(_ref("ship-order"), order_id, tracking_number="T1"))
    assert refused.value.details[0]["cancelled_by"] == "check-shipped"


async def test_a_ship_refused_after_the_customer_cancelled_does_not_blame_the_check(
    acts: FulfilmentActivities,
) -> None:
    order_id = await _confirmed(acts)
    await acts.use_cases.cancel_order(order_id, "changed my mind", CommandContext(actor="customer"))
    with pytest.raises(ApplicationError) as refused:
        await acts.ship_order(OrderArgs(_ref("ship-order"), order_id, tracking_number="T1"))
    assert refused.value.details[0]["status"] == "cancelled"
    assert "cancelled_by" not in refused.value.details[0]


async def test_a_ship_append_decided_before_the_check_and_committed_after_it_is_refused(
    acts: FulfilmentActivities, store: SqliteEventStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hazard itself: ``ShipOrder`` was decided on the confirmed order, and its append
    is held (a stalled disk, another process's writer lock) while ``check-shipped``
    cancels the order. The held append carries the revision it was decided at, so the
    store refuses it; the command's retry reloads and the order refuses the shipment."""
    order_id = await _confirmed(acts)
    release, held = asyncio.Event(), asyncio.Event()
    append = store.append

    async def held_shipment(stream: str, events: Any, expected: Any, **options: Any) -> Any:
        if any(e.type == "OrderShipped" for e in events) and not release.is_set():
            held.set()
            await release.wait()
        return await append(stream, events, expected, **options)

    monkeypatch.setattr(store, "append", held_shipment)
    shipping = OrderArgs(_ref("ship-order"), order_id, tracking_number="T1")
    ship = asyncio.ensure_future(acts.ship_order(shipping))
    await asyncio.wait_for(held.wait(), 10)
    check = OrderArgs(_ref("check-shipped"), order_id, reason="ship-order failed: no answer")
    assert await acts.cancel_unless_shipped(check) == "cancelled"
    release.set()
    with pytest.raises(ApplicationError) as refused:
        await asyncio.wait_for(ship, 10)
    assert (refused.value.type, refused.value.details[0]["status"]) == ("IllegalTransition", "cancelled")
    events = [e.type for e in await store.read_stream(f"order-{order_id}")]
    assert "OrderShipped" not in events
    assert events[-1] == "OrderCancelled"
