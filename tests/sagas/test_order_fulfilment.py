"""The order-fulfilment saga end to end: events -> trigger -> workflow -> activities
-> command handler -> events, against the real Temporal dev server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.worker import Replayer, UnsandboxedWorkflowRunner, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from orderstream.domain.common import IllegalTransition, Money
from orderstream.sagas.fulfilment.activities import FulfilmentActivities
from orderstream.sagas.fulfilment.inputs import (
    SIGNAL_PAYMENT_RESULT,
    OrderArgs,
    PaymentArgs,
    ShipSteps,
    payment_id_for,
    tracking_number_for,
    workflow_id_for,
)
from orderstream.sagas.fulfilment.payment_gateway import PaymentGatewayUnavailable, SandboxPaymentGateway
from orderstream.sagas.fulfilment.worker import WORKFLOW_RUNNER
from orderstream.sagas.fulfilment.workflow import OrderFulfilment
from tests.sagas.conftest import WAIT, SagaFactory, SagaHarness, local_activities

HAPPY_STEPS = [
    "reserve-stock/MUG",
    "reserve-stock/TEA",
    "mark-stock-reserved",
    "request-payment",
    "authorise-payment",
    "mark-payment-authorised",
    "confirm-order",
    "ship-order",
    "capture-payment",
    "commit-stock/MUG",
    "commit-stock/TEA",
]
"""Every step of a shipped order of MUG and TEA, as the ``status`` query lists them."""
ONE_LINE_STEPS = [step for step in HAPPY_STEPS if not step.endswith("/TEA")]
"""... of an order of MUG alone."""
JOINED = [
    "reserve_and_mark_stock",
    "request_and_authorise_payment",
    "confirm_paid_order",
    "ship_and_settle_order",
]
"""The local activities of a shipped order (one workflow activation each)."""


pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session")]


async def test_happy_path_ships_commits_stock_and_captures_payment(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    await saga.product("MUG", 10)
    await saga.product("TEA", 5)
    order_id = await saga.place("tok_approve", ("MUG", 2), ("TEA", 1))

    outcome = await saga.outcome(order_id)

    assert outcome.status == "shipped"
    assert outcome.error_type is None
    assert outcome.raw["tracking_number"] == tracking_number_for(workflow_id_for(order_id))
    assert (await saga.order(order_id)).status == "shipped"
    mug, tea = await saga.stock("MUG"), await saga.stock("TEA")
    assert (mug.on_hand, mug.reserved, tea.on_hand, tea.reserved) == (8, 0, 4, 0)
    assert (await saga.payment(order_id)).status == "captured"
    assert await saga.types(f"order-{order_id}") == [
        "OrderPlaced",
        "OrderStockReserved",
        "OrderPaymentAuthorised",
        "OrderConfirmed",
        "OrderShipped",
    ]
    assert await saga.types(f"payment-{payment_id_for(order_id)}") == [
        "PaymentRequested",
        "PaymentAuthorised",
        "PaymentCaptured",
    ]
    status = await saga.status(order_id)
    assert status["step"] == "shipped"
    assert status["compensations"] == []
    assert status["completed_steps"] == HAPPY_STEPS  # every step, though they ran joined
    assert local_activities(await saga.handle(order_id).fetch_history()) == JOINED


async def test_saga_events_carry_correlation_causation_and_step_keys(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_approve", ("MUG", 1))
    await saga.outcome(order_id)

    placed, *steps = await saga.stream(f"order-{order_id}")
    correlation = placed.metadata.correlation_id
    assert correlation
    for event in steps:
        meta = event.metadata
        assert meta.correlation_id == correlation
        assert meta.causation_id == str(placed.id)
        assert meta.actor == "saga:order-fulfilment"
        assert (meta.idempotency_key or "").startswith(f"{workflow_id_for(order_id)}/")
    description = await saga.handle(order_id).describe()
    memo = await description.memo()
    assert memo["correlation_id"] == correlation
    assert memo["causation_id"] == str(placed.id)


async def test_transient_gateway_errors_are_retried_then_approved(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_error", ("MUG", 1))

    outcome = await saga.outcome(order_id)

    assert outcome.status == "shipped"
    pid = payment_id_for(order_id)
    assert saga.gateway.calls.count(("authorise", pid)) == saga.gateway.transient_failures + 1
    assert (await saga.counts(f"payment-{pid}"))["PaymentAuthorised"] == 1


async def test_stock_short_rejects_and_reserves_nothing(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    await saga.product("MUG", 10)
    await saga.product("TEA", 1)
    await saga.product("CUP", 10)
    order_id = await saga.place("tok_approve", ("MUG", 2), ("TEA", 3), ("CUP", 1))

    outcome = await saga.outcome(order_id)

    assert outcome.status == "rejected"
    assert outcome.error_type is None  # completed: a business outcome
    assert "TEA" in (outcome.reason or "")
    order = await saga.order(order_id)
    assert order.status == "rejected"
    assert order.cancel_reason == outcome.reason
    mug, tea = await saga.stock("MUG"), await saga.stock("TEA")
    assert (mug.on_hand, mug.reserved, tea.on_hand, tea.reserved) == (10, 0, 1, 0)
    assert await saga.types("product-MUG") == [
        "ProductRegistered",
        "StockAdded",
        "StockReserved",
        "StockReleased",
    ]
    # Round 1 runs as one activity; it stopped at TEA, so CUP was never touched,
    # not even released (as when the reservations ran one by one).
    assert await saga.types("product-CUP") == ["ProductRegistered", "StockAdded"]
    assert await saga.types(f"payment-{payment_id_for(order_id)}") == []  # never asked for money
    assert outcome.compensations == [
        "release-stock/TEA: nothing reserved",
        "release-stock/MUG: released",
        "close-order: rejected",
    ]
    # The lines are read again (the customer may have changed them): they did not change.
    assert (await saga.status(order_id))["completed_steps"] == ["reserve-stock/MUG", "load-order-lines/2"]


async def test_declined_payment_releases_stock_and_cancels_with_the_reason(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_decline", ("MUG", 3))

    outcome = await saga.outcome(order_id)

    assert outcome.status == "compensated"
    assert outcome.error_type is None  # completed: a business outcome
    assert outcome.reason == "payment declined: card declined by the issuer"
    order = await saga.order(order_id)
    assert (order.status, order.cancel_reason) == ("cancelled", outcome.reason)
    mug = await saga.stock("MUG")
    assert (mug.on_hand, mug.reserved) == (10, 0)
    assert (await saga.payment(order_id)).status == "declined"
    assert outcome.compensations == [
        "void-payment: nothing to void (declined)",
        "release-stock/MUG: released",
        "close-order: cancelled",
    ]


async def test_unknown_token_is_declined(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_nonsense", ("MUG", 1))

    outcome = await saga.outcome(order_id)

    assert (outcome.status, outcome.reason) == ("compensated", "payment declined: unknown payment method")
    assert (await saga.order(order_id)).status == "cancelled"


async def test_pending_then_webhook_authorised_ships(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 2))
    await saga.reach_step(order_id, "await-payment-result")

    view = (await saga.http.get(f"/orders/{order_id}/fulfilment")).json()
    assert view["status"] == "running"
    assert view["step"] == "await-payment-result"
    assert view["payment_deadline"] is not None
    assert view["payment_id"] == payment_id_for(order_id)
    response = await saga.webhook(order_id, {"status": "authorised"})
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"id", "revision", "position"}
    assert response.headers["etag"] == f'"{response.json()["revision"]}"'

    outcome = await saga.outcome(order_id)

    assert outcome.status == "shipped"
    assert (await saga.order(order_id)).status == "shipped"
    assert (await saga.payment(order_id)).status == "captured"
    assert (await saga.stock("MUG")).on_hand == 8
    view = (await saga.http.get(f"/orders/{order_id}/fulfilment")).json()
    assert (view["status"], view["step"], view["outcome"]["status"]) == ("completed", "shipped", "shipped")
    assert "await-payment-result" in view["completed_steps"]


async def test_pending_then_webhook_declined_compensates(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 2))
    await saga.reach_step(order_id, "await-payment-result")

    response = await saga.webhook(order_id, {"status": "declined", "reason": "insufficient funds"})
    assert response.status_code == 200, response.text
    outcome = await saga.outcome(order_id)

    assert (outcome.status, outcome.reason) == ("compensated", "payment declined (webhook)")
    assert (await saga.order(order_id)).status == "cancelled"
    assert (await saga.stock("MUG")).reserved == 0


async def test_pending_past_the_deadline_is_compensated(make_saga: SagaFactory) -> None:
    saga = await make_saga(payment_deadline=1.0)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 4))

    outcome = await saga.outcome(order_id)

    assert outcome.status == "compensated"
    assert "deadline" in (outcome.reason or "")
    order = await saga.order(order_id)
    assert (order.status, order.cancel_reason) == ("cancelled", outcome.reason)
    assert (await saga.stock("MUG")).reserved == 0
    assert (await saga.payment(order_id)).status == "voided"
    assert outcome.compensations == [
        "void-payment: voided",
        "release-stock/MUG: released",
        "close-order: cancelled",
    ]
    # A decline after the deadline is refused: the payment was voided. (A late
    # authorisation is voided at the gateway: test_payment_deadline.py.)
    late = await saga.webhook(order_id, {"status": "declined"})
    assert late.status_code == 409
    assert late.headers["content-type"].startswith("application/problem+json")


async def test_customer_cancellation_while_pending_undoes_every_step(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    await saga.product("MUG", 10)
    await saga.product("TEA", 10)
    order_id = await saga.place("tok_pending", ("MUG", 2), ("TEA", 1))
    await saga.reach_step(order_id, "await-payment-result")

    await saga.container.use_cases.cancel_order(order_id, "changed my mind", saga.ctx)
    outcome = await saga.outcome(order_id)

    assert outcome.status == "cancelled"
    assert outcome.error_type is None  # completed: a business outcome
    assert outcome.reason == "cancelled: changed my mind"
    assert outcome.compensations == [
        "void-payment: voided",
        "release-stock/TEA: released",
        "release-stock/MUG: released",
        "close-order: already cancelled",
    ]
    for sku in ("MUG", "TEA"):
        product = await saga.stock(sku)
        assert (product.on_hand, product.reserved) == (10, 0)
    assert (await saga.payment(order_id)).status == "voided"
    order_events = await saga.stream(f"order-{order_id}")
    cancelled = [e for e in order_events if e.type == "OrderCancelled"]
    assert len(cancelled) == 1
    assert cancelled[0].metadata.actor == "test"  # the customer's, not the saga's
    assert (await saga.order(order_id)).cancel_reason == "changed my mind"


async def test_cancellation_after_shipment_is_refused(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_approve", ("MUG", 1))
    assert (await saga.outcome(order_id)).status == "shipped"

    with pytest.raises(IllegalTransition):
        await saga.container.use_cases.cancel_order(order_id, "too late", saga.ctx)
    assert (await saga.order(order_id)).status == "shipped"


# ----------------------------------------------- the pivot: ship-order and what follows
# ship-order, the capture and the commits run as one activity (ship_and_settle_order)
# under the forward retry policy; what fails after the parcel left is settled by the
# separate settle_shipped_order step, retried until it succeeds.


class CaptureFails(SandboxPaymentGateway):
    """The first ``failures`` captures fail: transiently (retried) or for good."""

    def __init__(self, failures: int, *, for_good: bool) -> None:
        super().__init__()
        self.failures, self.for_good, self.captures = failures, for_good, 0

    async def capture(self, payment_id: str, amount: Money) -> None:
        self.captures += 1
        if self.captures <= self.failures:
            if self.for_good:
                refused = "the processor refused the capture"
                raise ApplicationError(refused, {}, type="DomainError", non_retryable=True)
            raise PaymentGatewayUnavailable("capture timed out")
        await super().capture(payment_id, amount)


class ShippingRefused(FulfilmentActivities):
    """``ship-order`` fails for good: the order is not shipped."""

    @activity.defn(name="ship_order")
    async def ship_order(self, args: OrderArgs) -> None:
        raise ApplicationError("the carrier refused the parcel", {}, type="DomainError", non_retryable=True)


class NoWordFromShipping(FulfilmentActivities):
    """``ship_and_settle_order`` fails without saying whether it shipped, as a
    timed-out activity does; ``ships``: it shipped the order first."""

    ships = True

    @activity.defn(name="ship_and_settle_order")
    async def ship_and_settle_order(self, args: ShipSteps) -> None:
        if self.ships:
            await self.ship_order(args.ship)
        raise ApplicationError("no answer", type="Timeout", non_retryable=True)


async def _assert_replays(saga: SagaHarness, order_id: str) -> None:
    history = await saga.handle(order_id).fetch_history()
    result = await Replayer(workflows=[OrderFulfilment], workflow_runner=WORKFLOW_RUNNER).replay_workflow(
        history, raise_on_replay_failure=False
    )
    assert result.replay_failure is None, result.replay_failure


async def test_ship_refused_for_good_compensates(make_saga: SagaFactory) -> None:
    saga = await make_saga(worker=False)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_approve", ("MUG", 2))
    async with saga.worker_with(ShippingRefused(saga.container.use_cases, saga.gateway)):
        outcome = await saga.outcome(order_id)
        status = await saga.status(order_id)

    assert (outcome.status, outcome.error_type) == ("compensated", None)
    assert outcome.reason == "ship-order failed: the carrier refused the parcel"
    assert outcome.compensations == [
        "void-payment: voided",
        "release-stock/MUG: released",
        "close-order: cancelled",
    ]
    assert (await saga.order(order_id)).status == "cancelled"
    mug = await saga.stock("MUG")
    assert (mug.on_hand, mug.reserved) == (10, 0)
    assert (await saga.payment(order_id)).status == "voided"
    assert not [call for call in saga.gateway.calls if call[0] == "capture"]
    assert status["completed_steps"] == ONE_LINE_STEPS[:6]  # up to confirm-order
    await _assert_replays(saga, order_id)


@pytest.mark.parametrize("for_good", [False, True], ids=["transient", "for-good"])
async def test_a_capture_failing_after_ship_still_ships(make_saga: SagaFactory, for_good: bool) -> None:
    """Transient: the joined activity is retried (ship-order replays its result).
    For good: the order is shipped all the same; the capture and commit are
    settled on their own (``settle_shipped_order``, retried until they succeed)."""
    saga = await make_saga(worker=False)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_approve", ("MUG", 2))
    gateway = CaptureFails(1, for_good=for_good)
    async with saga.worker_with(FulfilmentActivities(saga.container.use_cases, gateway)):
        outcome = await saga.outcome(order_id)
        status = await saga.status(order_id)

    assert (outcome.status, outcome.error_type, outcome.compensations) == ("shipped", None, [])
    assert gateway.captures == 2
    assert (await saga.counts(f"order-{order_id}"))["OrderShipped"] == 1
    assert (await saga.counts(f"payment-{payment_id_for(order_id)}"))["PaymentCaptured"] == 1
    mug = await saga.stock("MUG")
    assert (mug.on_hand, mug.reserved) == (8, 0)
    assert status["completed_steps"] == ONE_LINE_STEPS
    settled_apart = ["settle_shipped_order"] if for_good else []
    assert local_activities(await saga.handle(order_id).fetch_history()) == JOINED + settled_apart
    await _assert_replays(saga, order_id)


async def test_a_capture_refused_for_good_after_ship_fails_the_run_and_undoes_nothing(
    make_saga: SagaFactory,
) -> None:
    saga = await make_saga(worker=False)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_approve", ("MUG", 2))
    gateway = CaptureFails(1_000, for_good=True)
    async with saga.worker_with(FulfilmentActivities(saga.container.use_cases, gateway)):
        handle = await saga.started(order_id)
        with pytest.raises(WorkflowFailureError) as failed:
            await asyncio.wait_for(handle.result(), WAIT)
        status = await saga.status(order_id)

    assert isinstance(failed.value.cause, ActivityError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.FAILED
    assert gateway.captures == 2  # the joined activity's, then settle_shipped_order's
    assert (await saga.order(order_id)).status == "shipped"
    mug = await saga.stock("MUG")
    assert (mug.on_hand, mug.reserved) == (10, 2)  # held for an operator: neither released nor committed
    assert (await saga.payment(order_id)).status == "authorised"  # not voided
    assert status["compensations"] == []
    assert status["step"] == "capture-payment"


@pytest.mark.parametrize("ships", [True, False], ids=["shipped", "not-shipped"])
async def test_no_word_from_the_ship_activity_asks_the_order_by_cancelling_it(
    make_saga: SagaFactory, ships: bool
) -> None:
    saga = await make_saga(worker=False)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_approve", ("MUG", 2))
    acts = NoWordFromShipping(saga.container.use_cases, saga.gateway)
    acts.ships = ships
    async with saga.worker_with(acts):
        outcome = await saga.outcome(order_id)
        status = await saga.status(order_id)

    steps = local_activities(await saga.handle(order_id).fetch_history())
    assert steps[:5] == [*JOINED, "cancel_unless_shipped"]
    if ships:
        assert (outcome.status, outcome.compensations) == ("shipped", [])
        assert steps[5:] == ["settle_shipped_order"]
        assert status["completed_steps"] == [*ONE_LINE_STEPS[:6], "check-shipped", *ONE_LINE_STEPS[6:]]
        assert (await saga.payment(order_id)).status == "captured"
        assert (await saga.stock("MUG")).on_hand == 8
        assert (await saga.counts(f"order-{order_id}")).get("OrderCancelled", 0) == 0
    else:
        assert (outcome.status, outcome.reason) == ("compensated", "ship-order failed: no answer")
        order = await saga.order(order_id)
        assert (order.status, order.cancel_reason) == ("cancelled", "ship-order failed: no answer")
        assert (await saga.payment(order_id)).status == "voided"
        assert steps[5:] == ["void_payment", "release_stock", "cancel_order"]
        assert status["completed_steps"] == [*ONE_LINE_STEPS[:6], "check-shipped"]
        assert outcome.compensations[-1] == "close-order: already cancelled"
    await _assert_replays(saga, order_id)


class LateShipment(NoWordFromShipping):
    """The failed ship activity's ``ShipOrder`` commits late: right after the saga
    asked whether the order was shipped, before its compensations (as a command
    queued behind a stalled disk would)."""

    ships = False
    late_ship: OrderArgs | None = None
    late_ship_refused: str | None = None

    @activity.defn(name="ship_and_settle_order")
    async def ship_and_settle_order(self, args: ShipSteps) -> None:
        self.late_ship = args.ship
        await super().ship_and_settle_order(args)

    @activity.defn(name="void_payment")
    async def void_payment(self, args: PaymentArgs) -> str:
        assert self.late_ship is not None
        try:
            await self.ship_order(self.late_ship)
        except ApplicationError as refused:
            self.late_ship_refused = refused.type
        return await super().void_payment(args)


async def test_a_shipment_committing_after_the_ship_check_cannot_ship_a_released_order(
    make_saga: SagaFactory,
) -> None:
    """``check-shipped`` is a write: the order is cancelled before the saga voids and
    releases, so the late ``ShipOrder`` is refused. (A read said "not shipped", the late
    shipment then passed, and the saga released the stock of a shipped order.)"""
    saga = await make_saga(worker=False)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_approve", ("MUG", 2))
    acts = LateShipment(saga.container.use_cases, saga.gateway)
    async with saga.worker_with(acts):
        outcome = await saga.outcome(order_id)

    assert acts.late_ship_refused == "IllegalTransition"
    assert (outcome.status, outcome.error_type) == ("compensated", None)  # no compensation failed
    assert (await saga.order(order_id)).status == "cancelled"
    assert (await saga.counts(f"order-{order_id}")).get("OrderShipped", 0) == 0
    mug = await saga.stock("MUG")
    assert (mug.on_hand, mug.reserved) == (10, 0)
    assert (await saga.payment(order_id)).status == "voided"
    await _assert_replays(saga, order_id)


class RerunAfterTheCheck(NoWordFromShipping):
    """The workflow task that ran the check and the compensations is thrown away: a
    signal arrives meanwhile, so the server refuses its completion (a worker crash does
    the same), and the run re-executes its local activities from the last recorded
    point. This time ``ship_and_settle_order`` runs for real and is refused: the
    order was cancelled, by the check of the attempt thrown away."""

    ships = False
    client: Client | None = None
    attempts = 0
    signalled = False

    @activity.defn(name="ship_and_settle_order")
    async def ship_and_settle_order(self, args: ShipSteps) -> None:
        self.attempts += 1
        if self.attempts == 1:
            await super().ship_and_settle_order(args)  # no word
        await FulfilmentActivities.ship_and_settle_order(self, args)

    @activity.defn(name="void_payment")
    async def void_payment(self, args: PaymentArgs) -> str:
        if not self.signalled and self.client is not None:
            self.signalled = True
            handle = self.client.get_workflow_handle(activity.info().workflow_id)
            await handle.signal(SIGNAL_PAYMENT_RESULT, "authorised")  # ignored by then
        return await super().void_payment(args)


async def test_a_run_re_executing_after_its_check_does_not_blame_the_customer(make_saga: SagaFactory) -> None:
    """The refusal of the re-run's ship-order says the saga's own check cancelled the
    order (review: it ended ``cancelled by the customer``, counted as a cancellation)."""
    saga = await make_saga(worker=False)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_approve", ("MUG", 2))
    acts = RerunAfterTheCheck(saga.container.use_cases, saga.gateway)
    acts.client = saga.env.client
    async with saga.worker_with(acts):
        outcome = await saga.outcome(order_id)

    assert acts.attempts == 2  # the re-run happened
    assert outcome.status == "compensated", outcome
    assert outcome.reason is not None
    assert outcome.reason.startswith("ship-order failed: ")
    order = await saga.order(order_id)
    assert (order.status, order.cancel_reason) == ("cancelled", "ship-order failed: no answer")
    assert (await saga.payment(order_id)).status == "voided"
    mug = await saga.stock("MUG")
    assert (mug.on_hand, mug.reserved) == (10, 0)
    await _assert_replays(saga, order_id)


async def test_redelivered_order_placed_starts_one_workflow(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 1))
    await saga.reach_step(order_id, "await-payment-result")
    handle = saga.handle(order_id)
    first_run = (await handle.describe()).run_id
    placed = (await saga.stream(f"order-{order_id}"))[0]

    again = await saga.trigger.handle(placed)  # the same event, delivered again while running
    assert again.action == "already started"
    assert (await saga.webhook(order_id, {"status": "authorised"})).status_code == 200
    assert (await saga.outcome(order_id)).status == "shipped"
    after = await saga.trigger.handle(placed)  # ... and after the saga finished
    assert after.action == "already started"

    assert (await handle.describe()).run_id == first_run
    runs = [w async for w in saga.env.client.list_workflows(f"WorkflowId = '{workflow_id_for(order_id)}'")]
    assert [w.run_id for w in runs] == [first_run]
    counts = await saga.counts(f"order-{order_id}")
    assert counts["OrderShipped"] == 1


async def test_fulfilment_route_for_unknown_order_is_404(make_saga: SagaFactory) -> None:
    saga = await make_saga(worker=False)
    response = await saga.http.get("/orders/no-such-order/fulfilment")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")


async def test_webhook_validation(make_saga: SagaFactory) -> None:
    saga = await make_saga(worker=False)
    unknown = await saga.webhook("", {"status": "authorised"}, payment_id="no-such-payment")
    assert unknown.status_code == 404
    assert unknown.json()["status"] == 404
    extra = await saga.webhook("", {"status": "authorised", "amount": 1}, payment_id="p1")
    assert extra.status_code == 422
    wrong = await saga.webhook("", {"status": "maybe"}, payment_id="p1")
    assert wrong.status_code == 422
    no_event_id = await saga.webhook("", {"event_id": "", "status": "authorised"}, payment_id="p1")
    assert no_event_id.status_code == 422
    final_newline = await saga.webhook("", {"event_id": "evt-1\n", "status": "authorised"}, payment_id="p1")
    assert final_newline.status_code == 422


async def test_cancelled_right_after_placing_reserves_nothing_in_the_end(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_approve", ("MUG", 2))
    await saga.container.use_cases.cancel_order(order_id, "oops", saga.ctx)  # races the saga's first steps

    outcome = await saga.outcome(order_id)

    assert outcome.status == "cancelled"
    assert outcome.error_type is None  # completed: a business outcome
    assert (await saga.stock("MUG")).reserved == 0
    assert (await saga.order(order_id)).status == "cancelled"
    assert (await saga.counts(f"order-{order_id}"))["OrderCancelled"] == 1
    assert await saga.types(f"payment-{payment_id_for(order_id)}") == []


async def test_cancelling_the_workflow_through_temporal_compensates(make_saga: SagaFactory) -> None:
    saga = await make_saga()
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 2))
    await saga.reach_step(order_id, "await-payment-result")

    handle = saga.handle(order_id)
    await handle.cancel()  # an operator, from the CLI or the Web UI
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), WAIT)

    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert (await saga.stock("MUG")).reserved == 0
    assert (await saga.payment(order_id)).status == "voided"
    order = await saga.order(order_id)
    assert (order.status, order.cancel_reason) == ("cancelled", "saga cancelled through Temporal")


async def test_histories_replay_deterministically(make_saga: SagaFactory) -> None:
    saga = await make_saga(payment_deadline=0.5)
    await saga.product("MUG", 10)
    shipped = await saga.place("tok_approve", ("MUG", 1))
    timed_out = await saga.place("tok_pending", ("MUG", 1))
    assert (await saga.outcome(shipped)).status == "shipped"
    assert (await saga.outcome(timed_out)).status == "compensated"

    replayer = Replayer(workflows=[OrderFulfilment], workflow_runner=WORKFLOW_RUNNER)
    for order_id in (shipped, timed_out):
        history = await saga.handle(order_id).fetch_history()
        result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
        assert result.replay_failure is None, result.replay_failure


HISTORIES = Path(__file__).parent / "histories"
RECORDED_HISTORY = HISTORIES / "shipped-local-steps.json"


@pytest.mark.parametrize(
    "runner",
    [WORKFLOW_RUNNER, SandboxedWorkflowRunner(), UnsandboxedWorkflowRunner()],
    ids=["passed-through", "default-sandbox", "unsandboxed"],
)
async def test_a_recorded_history_replays_in_either_sandbox(runner: WorkflowRunner) -> None:
    """A shipped saga (local steps) recorded by this code: it keeps replaying, and
    its input (``FulfilmentInput`` with string hints) decodes with the workflow
    module passed through the sandbox as with the SDK's default sandbox."""
    history = WorkflowHistory.from_json("order-fulfilment-recorded", RECORDED_HISTORY.read_text())
    replayer = Replayer(workflows=[OrderFulfilment], workflow_runner=runner)

    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)

    assert result.replay_failure is None, result.replay_failure


RECORDED_LOCAL_ACTIVITIES = {
    # Recorded by main's code (session 16): patch joined-steps, outcome-completes.
    "shipped-joined-steps": [
        "reserve_stock",
        "reserve_stock",
        "mark_stock_reserved",
        "request_and_authorise_payment",
        "confirm_paid_order",
        "ship_order",
        "settle_shipped_order",
    ],
    "rejected-joined-steps": [
        "reserve_stock",
        "reserve_stock",  # short: TEA
        "load_order_lines",
        "release_stock",
        "release_stock",
        "reject_order",
    ],
    "lines-changed-joined-steps": [
        "reserve_stock",
        "reserve_stock",
        "mark_stock_reserved",  # refused: the lines changed
        "load_order_lines",
        "reserve_stock",
        "reserve_stock",
        "mark_stock_reserved",
        "release_stock",
        "request_and_authorise_payment",
        "confirm_paid_order",
        "ship_order",
        "settle_shipped_order",
    ],
    # Runs whose ship activity gave no answer, recorded by session 16's code: the
    # check-shipped read (before patch fenced-ship-check).
    "shipped-read-ship-check": [*JOINED, "load_order_status", "settle_shipped_order"],
    "compensated-read-ship-check": [
        *JOINED,
        "load_order_status",
        "void_payment",
        "release_stock",
        "cancel_order",
    ],
    # ... and by this code, with patch joined-reserve-and-ship.
    "shipped-joined-reserve-and-ship": JOINED,
    "rejected-joined-reserve-and-ship": [
        "reserve_and_mark_stock",  # short at TEA: CUP untried
        "load_order_lines",
        "release_stock",
        "release_stock",
        "reject_order",
    ],
    "lines-changed-joined-reserve-and-ship": [
        "reserve_and_mark_stock",  # refused at the mark
        "load_order_lines",
        "reserve_stock",
        "reserve_stock",
        "mark_stock_reserved",
        "release_stock",
        "request_and_authorise_payment",
        "confirm_paid_order",
        "ship_and_settle_order",
    ],
}


@pytest.mark.parametrize("name", sorted(RECORDED_LOCAL_ACTIVITIES))
async def test_runs_recorded_before_and_after_the_reserve_and_ship_joins_replay(name: str) -> None:
    """Shipped, rejected (short stock) and lines-changed runs recorded with the
    saga's search attributes, by the code before ``joined-reserve-and-ship`` (its
    runs replay their steps one by one) and by this code."""
    history = WorkflowHistory.from_json(f"recorded-{name}", (HISTORIES / f"{name}.json").read_text())
    assert local_activities(history) == RECORDED_LOCAL_ACTIVITIES[name]
    replayer = Replayer(workflows=[OrderFulfilment], workflow_runner=WORKFLOW_RUNNER)

    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)

    assert result.replay_failure is None, result.replay_failure
    assert history.events[-1].HasField("workflow_execution_completed_event_attributes")
