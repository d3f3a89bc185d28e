"""Sagas never undo what happened (issue 12, item 2), against the real dev server.

- The payment deadline consults the payment's stream: an authorisation the
  webhook recorded while its signal could not reach the saga (the trigger was
  cut off from Temporal) wins over the deadline, and the order ships.
- An authorisation that arrives after the deadline voided the payment is voided
  at the gateway and recorded (``LateAuthorisationVoided``), once.
"""

from __future__ import annotations

import asyncio

import pytest
from temporalio.api.enums.v1 import EventType

from orderstream.sagas.fulfilment.inputs import payment_id_for
from orderstream.sagas.fulfilment.payment_gateway import (
    PaymentGatewayUnavailable,
    SandboxPaymentGateway,
)
from tests.sagas.conftest import WAIT, SagaFactory, SagaHarness

pytestmark = [pytest.mark.temporal, pytest.mark.asyncio(loop_scope="session")]


async def cut_off_trigger(saga: SagaHarness) -> None:
    """Stop the trigger: from now on the webhook's events are recorded but no
    signal reaches the saga, as while Temporal cannot be reached."""
    saga.trigger_stop.set()
    trigger_task = saga.tasks[0]
    await asyncio.wait_for(trigger_task, WAIT)


async def signals(saga: SagaHarness, order_id: str) -> int:
    history = await saga.handle(order_id).fetch_history()
    return sum(1 for e in history.events if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED)


async def test_an_authorisation_recorded_while_waiting_wins_over_the_deadline(make_saga: SagaFactory) -> None:
    saga = await make_saga(payment_deadline=3.0)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 2))
    await saga.reach_step(order_id, "await-payment-result")
    await cut_off_trigger(saga)

    response = await saga.webhook(order_id, {"status": "authorised", "authorisation_code": "AUTH-1"})
    assert response.status_code == 200, response.text
    outcome = await saga.outcome(order_id)

    assert outcome.status == "shipped", outcome
    assert await signals(saga, order_id) == 0  # the deadline fired; the stream decided
    status = await saga.status(order_id)
    assert {"payment-deadline", "await-payment-result"} <= set(status["completed_steps"])
    assert (await saga.order(order_id)).status == "shipped"
    assert (await saga.payment(order_id)).status == "captured"
    assert "PaymentVoided" not in await saga.types(f"payment-{payment_id_for(order_id)}")
    assert ("void", payment_id_for(order_id)) not in saga.gateway.calls
    assert (await saga.stock("MUG")).on_hand == 8


async def test_a_decline_recorded_while_waiting_compensates_as_declined(make_saga: SagaFactory) -> None:
    saga = await make_saga(payment_deadline=3.0)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 1))
    await saga.reach_step(order_id, "await-payment-result")
    await cut_off_trigger(saga)

    response = await saga.webhook(order_id, {"status": "declined", "reason": "insufficient funds"})
    assert response.status_code == 200, response.text
    outcome = await saga.outcome(order_id)

    assert (outcome.status, outcome.reason) == ("compensated", "payment declined (webhook)")
    assert (await saga.payment(order_id)).status == "declined"
    assert (await saga.stock("MUG")).reserved == 0


async def test_a_late_authorisation_after_the_void_is_voided_and_recorded(make_saga: SagaFactory) -> None:
    saga = await make_saga(payment_deadline=1.0)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 4))
    outcome = await saga.outcome(order_id)
    assert outcome.status == "compensated"
    assert "deadline" in (outcome.reason or "")
    pid = payment_id_for(order_id)
    assert saga.gateway.calls.count(("void", pid)) == 1  # the compensation

    late = await saga.webhook(order_id, {"status": "authorised", "authorisation_code": "LATE-1"})
    again = await saga.webhook(order_id, {"status": "authorised", "authorisation_code": "LATE-1"})

    assert (late.status_code, again.status_code) == (200, 200), (late.text, again.text)
    assert saga.gateway.calls.count(("void", pid)) == 3  # the late hold given back, idempotently
    events = await saga.stream(f"payment-{pid}")
    late_voids = [e for e in events if e.type == "LateAuthorisationVoided"]
    assert len(late_voids) == 1
    payment = await saga.payment(order_id)
    assert (payment.status, payment.late_authorisations_voided) == ("voided", ("LATE-1",))
    assert (await saga.order(order_id)).status == "cancelled"
    # A decline after the void changes nothing: refused as before.
    declined = await saga.webhook(order_id, {"status": "declined"})
    assert declined.status_code == 409


class UnreachableGateway(SandboxPaymentGateway):
    """The sandbox with its void failing as a processor outage does."""

    async def void(self, payment_id: str) -> None:
        raise PaymentGatewayUnavailable("processor unreachable")


async def test_a_late_authorisation_while_the_gateway_is_down_is_503_and_records_nothing(
    make_saga: SagaFactory,
) -> None:
    saga = await make_saga(payment_deadline=1.0)
    await saga.product("MUG", 10)
    order_id = await saga.place("tok_pending", ("MUG", 1))
    assert (await saga.outcome(order_id)).status == "compensated"
    saga.fulfilment.gateway = UnreachableGateway()
    pid = payment_id_for(order_id)
    before = await saga.types(f"payment-{pid}")

    late = await saga.webhook(order_id, {"status": "authorised", "authorisation_code": "LATE-2"})

    assert late.status_code == 503, late.text
    assert late.headers["retry-after"] == "5"
    assert late.headers["content-type"].startswith("application/problem+json")
    assert await saga.types(f"payment-{pid}") == before
    saga.fulfilment.gateway = saga.gateway
    retried = await saga.webhook(order_id, {"status": "authorised", "authorisation_code": "LATE-2"})
    assert retried.status_code == 200, retried.text
    assert (await saga.payment(order_id)).late_authorisations_voided == ("LATE-2",)
