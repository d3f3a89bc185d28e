"""The payment decider, as a specification grouped by the state a payment starts from.

``requested`` -> ``authorised`` -> ``captured`` (-> ``refunded``), or ``declined``,
or ``voided`` (an authorisation, or a pending request, given back before capture).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from msgspec.structs import replace

from orderstream.domain import payments
from orderstream.domain.common import AlreadyExists, IllegalTransition, InvalidCommand, Money, NotFound
from orderstream.domain.payments import (
    AuthorisePayment,
    CapturePayment,
    DeclinePayment,
    PaymentAuthorised,
    PaymentCaptured,
    PaymentCommand,
    PaymentDeclined,
    PaymentRefunded,
    PaymentRequested,
    PaymentVoided,
    RefundPayment,
    RequestPayment,
    VoidPayment,
)
from tests.unit.given_when_then import spec

given = spec(payments.decider).given

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=1)
T2 = T0 + timedelta(minutes=2)
NOW = T0 + timedelta(hours=1)

PAYMENT = "pay-1"
ORDER = "ord-1"
AMOUNT = Money(3499, "EUR")

# ------------------------------------------------------------------------- history

requested = PaymentRequested(
    payment_id=PAYMENT, order_id=ORDER, amount=AMOUNT, payment_method_id="pm_sbx_approve_1", at=T0
)
authorised = PaymentAuthorised(payment_id=PAYMENT, order_id=ORDER, authorisation_code="AUTH-1", at=T1)
declined = PaymentDeclined(payment_id=PAYMENT, order_id=ORDER, reason="insufficient funds", at=T1)
voided = PaymentVoided(payment_id=PAYMENT, order_id=ORDER, reason="order cancelled", at=T2)
captured = PaymentCaptured(payment_id=PAYMENT, order_id=ORDER, amount=AMOUNT, at=T2)
refunded = PaymentRefunded(payment_id=PAYMENT, order_id=ORDER, amount=AMOUNT, reason="returned", at=T2)

# ------------------------------------------------------------------------ commands

request = RequestPayment(
    payment_id=PAYMENT, order_id=ORDER, amount=AMOUNT, payment_method_id="pm_sbx_approve_1", now=NOW
)
authorise = AuthorisePayment(payment_id=PAYMENT, authorisation_code="AUTH-9", now=NOW)
decline = DeclinePayment(payment_id=PAYMENT, reason="card expired", now=NOW)
void = VoidPayment(payment_id=PAYMENT, reason="order cancelled", now=NOW)
capture = CapturePayment(payment_id=PAYMENT, now=NOW)
refund = RefundPayment(payment_id=PAYMENT, reason="customer returned the goods", now=NOW)

HISTORIES = {
    "requested": (requested,),
    "authorised": (requested, authorised),
    "declined": (requested, declined),
    "voided after request": (requested, voided),
    "voided after authorisation": (requested, authorised, voided),
    "captured": (requested, authorised, captured),
    "refunded": (requested, authorised, captured, refunded),
}


def name(command: PaymentCommand) -> str:
    return type(command).__name__


# ================================================================== no payment yet


class TestNoPaymentYet:
    def test_a_payment_can_be_requested(self) -> None:
        state = (
            given()
            .when(request)
            .then(
                PaymentRequested(
                    payment_id=PAYMENT,
                    order_id=ORDER,
                    amount=AMOUNT,
                    payment_method_id="pm_sbx_approve_1",
                    at=NOW,
                )
            )
        )
        assert (state.status, state.order_id, state.amount) == ("requested", ORDER, AMOUNT)

    @pytest.mark.parametrize(
        "amount", [Money(-1, "EUR"), Money(10**12 + 1, "EUR"), Money(1, "E")], ids=["negative", "huge", "E"]
    )
    def test_an_invalid_amount_is_refused(self, amount: Money) -> None:
        bad = RequestPayment(
            payment_id=PAYMENT, order_id=ORDER, amount=amount, payment_method_id="pm_sbx_approve_1", now=NOW
        )
        given().when(bad).then_raises(InvalidCommand)

    @pytest.mark.parametrize("command", [authorise, decline, void, capture, refund], ids=name)
    def test_any_other_command_needs_the_payment(self, command: PaymentCommand) -> None:
        error = given().when(command).then_raises(NotFound)
        assert (error.what, error.ident) == ("payment", PAYMENT)


# ===================================================== requesting again, from any state


@pytest.mark.parametrize("history", list(HISTORIES.values()), ids=list(HISTORIES))
class TestRequestingAgain:
    def test_the_same_request_again_is_nothing(self, history: tuple[payments.PaymentEvent, ...]) -> None:
        given(*history).when(request).then_nothing()

    def test_the_same_request_with_another_payment_method_is_nothing(
        self, history: tuple[payments.PaymentEvent, ...]
    ) -> None:
        given(*history).when(replace(request, payment_method_id="pm_sbx_decline_2")).then_nothing()

    def test_a_request_for_another_order_is_refused(self, history: tuple[payments.PaymentEvent, ...]) -> None:
        given(*history).when(replace(request, order_id="ord-2")).then_raises(AlreadyExists)

    def test_a_request_for_another_amount_is_refused(
        self, history: tuple[payments.PaymentEvent, ...]
    ) -> None:
        given(*history).when(replace(request, amount=Money(1, "EUR"))).then_raises(AlreadyExists)


# ======================================================================== requested


class TestRequested:
    history = (requested,)

    def test_it_can_be_authorised(self) -> None:
        state = (
            given(*self.history)
            .when(authorise)
            .then(PaymentAuthorised(payment_id=PAYMENT, order_id=ORDER, authorisation_code="AUTH-9", at=NOW))
        )
        assert state.status == "authorised"

    def test_it_can_be_declined(self) -> None:
        given(*self.history).when(decline).then(
            PaymentDeclined(payment_id=PAYMENT, order_id=ORDER, reason="card expired", at=NOW)
        )

    def test_it_can_be_voided_before_an_answer(self) -> None:
        given(*self.history).when(void).then(
            PaymentVoided(payment_id=PAYMENT, order_id=ORDER, reason="order cancelled", at=NOW)
        )

    @pytest.mark.parametrize("command", [capture, refund], ids=name)
    def test_nothing_authorised_cannot_be_captured_or_refunded(self, command: PaymentCommand) -> None:
        error = given(*self.history).when(command).then_raises(IllegalTransition)
        assert error.status == "requested"


# ======================================================================= authorised


class TestAuthorised:
    history = (requested, authorised)

    def test_authorising_again_is_nothing(self) -> None:
        given(*self.history).when(authorise).then_nothing()

    def test_capture_takes_the_requested_amount(self) -> None:
        state = (
            given(*self.history)
            .when(capture)
            .then(PaymentCaptured(payment_id=PAYMENT, order_id=ORDER, amount=AMOUNT, at=NOW))
        )
        assert state.status == "captured"

    def test_it_can_be_voided(self) -> None:
        state = (
            given(*self.history)
            .when(void)
            .then(PaymentVoided(payment_id=PAYMENT, order_id=ORDER, reason="order cancelled", at=NOW))
        )
        assert state.status == "voided"

    @pytest.mark.parametrize("command", [decline, refund], ids=name)
    def test_illegal_transitions(self, command: PaymentCommand) -> None:
        given(*self.history).when(command).then_raises(IllegalTransition)


# ========================================================================= declined


class TestDeclined:
    history = (requested, declined)

    def test_declining_again_is_nothing(self) -> None:
        given(*self.history).when(decline).then_nothing()

    def test_voiding_is_nothing_as_nothing_is_held(self) -> None:
        given(*self.history).when(void).then_nothing()

    @pytest.mark.parametrize("command", [authorise, capture, refund], ids=name)
    def test_illegal_transitions(self, command: PaymentCommand) -> None:
        given(*self.history).when(command).then_raises(IllegalTransition)


# =========================================================================== voided


class TestVoided:
    history = (requested, authorised, voided)

    def test_voiding_again_is_nothing(self) -> None:
        given(*self.history).when(void).then_nothing()

    @pytest.mark.parametrize("command", [authorise, decline, capture, refund], ids=name)
    def test_illegal_transitions(self, command: PaymentCommand) -> None:
        error = given(*self.history).when(command).then_raises(IllegalTransition)
        assert error.status == "voided"


# ========================================================================= captured


class TestCaptured:
    history = (requested, authorised, captured)

    def test_capturing_again_is_nothing(self) -> None:
        given(*self.history).when(capture).then_nothing()

    def test_refund_gives_back_the_captured_amount(self) -> None:
        state = (
            given(*self.history)
            .when(refund)
            .then(
                PaymentRefunded(
                    payment_id=PAYMENT,
                    order_id=ORDER,
                    amount=AMOUNT,
                    reason="customer returned the goods",
                    at=NOW,
                )
            )
        )
        assert state.status == "refunded"

    def test_a_captured_payment_cannot_be_voided(self) -> None:
        error = given(*self.history).when(void).then_raises(IllegalTransition)
        assert error.status == "captured"

    def test_an_authorisation_delivered_again_is_nothing(self) -> None:
        given(*self.history).when(authorise).then_nothing()

    def test_a_decline_is_illegal(self) -> None:
        given(*self.history).when(decline).then_raises(IllegalTransition)


# ========================================================================= refunded


class TestRefunded:
    history = (requested, authorised, captured, refunded)

    def test_refunding_again_is_nothing(self) -> None:
        given(*self.history).when(refund).then_nothing()

    def test_voiding_is_nothing_as_nothing_is_held(self) -> None:
        given(*self.history).when(void).then_nothing()

    def test_an_authorisation_delivered_again_is_nothing(self) -> None:
        given(*self.history).when(authorise).then_nothing()

    @pytest.mark.parametrize("command", [decline, capture], ids=name)
    def test_illegal_transitions(self, command: PaymentCommand) -> None:
        given(*self.history).when(command).then_raises(IllegalTransition)


def test_the_stream_of_a_payment() -> None:
    assert payments.decider.category == "payment"
    assert payments.stream_name(PAYMENT) == "payment-pay-1"
