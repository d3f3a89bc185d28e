"""The payment aggregate (stream ``payment-{payment_id}``).

``requested`` -> ``authorised`` -> ``captured`` (-> ``refunded``), or
``declined``, or ``voided`` (an authorisation given back before capture).

A provider may still authorise a payment after it was voided (its webhook came
after the saga's payment deadline): that hold is given back at the gateway and
recorded as ``LateAuthorisationVoided``; the payment stays ``voided``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal, assert_never

import msgspec
from msgspec.structs import replace

from orderstream.domain.common import (
    AlreadyExists,
    FunctionalDecider,
    IllegalTransition,
    Money,
    NotFound,
    conforming,
)

CATEGORY = "payment"

PaymentStatus = Literal["requested", "authorised", "declined", "voided", "captured", "refunded"]


class PaymentRequested(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str
    order_id: str
    amount: Money
    payment_method_id: str
    """The vault's reference (``pm_...``), never a card token."""
    at: datetime


class PaymentAuthorised(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str
    order_id: str
    authorisation_code: str
    at: datetime


class PaymentDeclined(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str
    order_id: str
    reason: str
    at: datetime


class PaymentVoided(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str
    order_id: str
    reason: str
    at: datetime


class PaymentCaptured(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str
    order_id: str
    amount: Money
    at: datetime


class PaymentRefunded(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str
    order_id: str
    amount: Money
    reason: str
    at: datetime


class LateAuthorisationVoided(msgspec.Struct, frozen=True, kw_only=True):
    """The provider authorised the payment after it was voided; that hold was
    voided at the gateway (nothing is charged). The status stays ``voided``."""

    payment_id: str
    order_id: str
    authorisation_code: str
    at: datetime


PaymentEvent = (
    PaymentRequested
    | PaymentAuthorised
    | PaymentDeclined
    | PaymentVoided
    | PaymentCaptured
    | PaymentRefunded
    | LateAuthorisationVoided
)


class RequestPayment(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str
    order_id: str
    amount: Money
    payment_method_id: str
    now: datetime


class AuthorisePayment(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str
    authorisation_code: str
    now: datetime


class DeclinePayment(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str
    reason: str
    now: datetime


class VoidPayment(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str
    reason: str
    now: datetime


class CapturePayment(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str
    now: datetime


class RefundPayment(msgspec.Struct, frozen=True, kw_only=True):
    payment_id: str
    reason: str
    now: datetime


class ExpirePayment(msgspec.Struct, frozen=True, kw_only=True):
    """The saga's payment deadline passed: void the payment if it still waits for
    the provider. A result recorded meanwhile (the webhook's, while its signal
    could not reach the saga) wins: then nothing happens. Deciding it here, on the
    payment's state at one revision, leaves no gap between the check and the void."""

    payment_id: str
    reason: str
    now: datetime


class VoidLateAuthorisation(msgspec.Struct, frozen=True, kw_only=True):
    """Record that an authorisation which arrived after the void was given back
    at the gateway. Only for a ``voided`` payment; once per authorisation code."""

    payment_id: str
    authorisation_code: str
    now: datetime


PaymentCommand = (
    RequestPayment
    | AuthorisePayment
    | DeclinePayment
    | VoidPayment
    | CapturePayment
    | RefundPayment
    | ExpirePayment
    | VoidLateAuthorisation
)


class Payment(msgspec.Struct, frozen=True, kw_only=True):
    status: PaymentStatus | None = None
    payment_id: str = ""
    order_id: str = ""
    amount: Money | None = None
    late_authorisations_voided: tuple[str, ...] = ()
    """Codes of authorisations that arrived after the void and were given back."""


initial_state = Payment()


def evolve(state: Payment, event: PaymentEvent) -> Payment:
    match event:
        case PaymentRequested():
            return Payment(
                status="requested", payment_id=event.payment_id, order_id=event.order_id, amount=event.amount
            )
        case PaymentAuthorised():
            return replace(state, status="authorised")
        case PaymentDeclined():
            return replace(state, status="declined")
        case PaymentVoided():
            return replace(state, status="voided")
        case PaymentCaptured():
            return replace(state, status="captured")
        case PaymentRefunded():
            return replace(state, status="refunded")
        case LateAuthorisationVoided():
            voided = (*state.late_authorisations_voided, event.authorisation_code)
            return replace(state, late_authorisations_voided=voided)
    assert_never(event)


def decide(command: PaymentCommand, state: Payment) -> Sequence[PaymentEvent]:
    if isinstance(command, RequestPayment):
        if state.status is not None:
            if state.order_id == command.order_id and state.amount == command.amount:
                return []  # the same request again
            raise AlreadyExists("payment", command.payment_id)
        conforming(command.amount, "amount")
        return [
            PaymentRequested(
                payment_id=command.payment_id,
                order_id=command.order_id,
                amount=command.amount,
                payment_method_id=command.payment_method_id,
                at=command.now,
            )
        ]
    if state.status is None or state.amount is None:
        raise NotFound("payment", command.payment_id)
    status, pid, oid = state.status, state.payment_id, state.order_id
    match command:
        case AuthorisePayment():
            if status in ("authorised", "captured", "refunded"):
                # Old news: it was authorised on the way here. The provider's delivery,
                # sent again (or a second copy racing the first) after the capture, is
                # answered as it was the first time, not with a 409 a provider may drop.
                return []
            if status != "requested":
                raise IllegalTransition(status, "authorise")
            return [
                PaymentAuthorised(
                    payment_id=pid,
                    order_id=oid,
                    authorisation_code=command.authorisation_code,
                    at=command.now,
                )
            ]
        case DeclinePayment():
            if status == "declined":
                return []
            if status != "requested":
                raise IllegalTransition(status, "decline")
            return [PaymentDeclined(payment_id=pid, order_id=oid, reason=command.reason, at=command.now)]
        case VoidPayment():
            if status in ("voided", "declined", "refunded"):
                return []  # nothing held any more: compensation is idempotent
            if status == "captured":
                raise IllegalTransition(status, "void (refund instead)")
            return [PaymentVoided(payment_id=pid, order_id=oid, reason=command.reason, at=command.now)]
        case CapturePayment():
            if status == "captured":
                return []
            if status != "authorised":
                raise IllegalTransition(status, "capture")
            return [PaymentCaptured(payment_id=pid, order_id=oid, amount=state.amount, at=command.now)]
        case RefundPayment():
            if status == "refunded":
                return []
            if status != "captured":
                raise IllegalTransition(status, "refund")
            return [
                PaymentRefunded(
                    payment_id=pid, order_id=oid, amount=state.amount, reason=command.reason, at=command.now
                )
            ]
        case ExpirePayment():
            if status != "requested":
                return []  # authorised, declined or voided already: that stands
            return [PaymentVoided(payment_id=pid, order_id=oid, reason=command.reason, at=command.now)]
        case VoidLateAuthorisation():
            if status != "voided":
                raise IllegalTransition(status, "void a late authorisation")
            if command.authorisation_code in state.late_authorisations_voided:
                return []
            return [
                LateAuthorisationVoided(
                    payment_id=pid,
                    order_id=oid,
                    authorisation_code=command.authorisation_code,
                    at=command.now,
                )
            ]
    assert_never(command)


decider: FunctionalDecider[PaymentCommand, PaymentEvent, Payment] = FunctionalDecider(
    CATEGORY, initial_state, evolve, decide
)


def stream_name(payment_id: str) -> str:
    return f"{CATEGORY}-{payment_id}"
