"""The payment decider's part in "sagas never undo what happened" (issue 12, item 2):
the deadline voids only a payment still waiting; a late authorisation after the
void is recorded once."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from orderstream.domain import payments
from orderstream.domain.common import IllegalTransition, Money

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _voided(*late: str) -> payments.Payment:
    return payments.Payment(
        status="voided",
        payment_id="p1",
        order_id="o1",
        amount=Money(100, "EUR"),
        late_authorisations_voided=late,
    )


@pytest.mark.parametrize("status", ["authorised", "declined", "voided"])
def test_expire_leaves_a_recorded_result_alone(status: payments.PaymentStatus) -> None:
    state = payments.Payment(status=status, payment_id="p1", order_id="o1", amount=Money(100, "EUR"))
    assert payments.decide(payments.ExpirePayment(payment_id="p1", reason="late", now=NOW), state) == []


def test_expire_voids_a_payment_still_requested() -> None:
    state = payments.Payment(status="requested", payment_id="p1", order_id="o1", amount=Money(100, "EUR"))
    (event,) = payments.decide(payments.ExpirePayment(payment_id="p1", reason="late", now=NOW), state)
    assert isinstance(event, payments.PaymentVoided)
    assert event.reason == "late"


def test_a_late_authorisation_is_recorded_once_and_only_on_a_voided_payment() -> None:
    command = payments.VoidLateAuthorisation(payment_id="p1", authorisation_code="A", now=NOW)
    (event,) = payments.decide(command, _voided())
    assert payments.evolve(_voided(), event).late_authorisations_voided == ("A",)
    assert payments.decide(command, _voided("A")) == []
    captured = payments.Payment(status="captured", payment_id="p1", order_id="o1", amount=Money(100, "EUR"))
    with pytest.raises(IllegalTransition):
        payments.decide(command, captured)
