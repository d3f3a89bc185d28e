"""The payment gateway port, and the sandbox gateway that decides by payment method.

The saga's activities talk to a card processor through :class:`PaymentGateway`
only; a real processor (Stripe, Adyen, ...) plugs in behind the same four
calls. Every call is keyed by the payment id, which a real adapter sends as the
processor's idempotency key: a retried activity must not charge twice.

No card token at rest: placing an order exchanges the token at the payment
vault (:class:`~orderstream.application.payment_vault.PaymentVault`, the core's
port) for a payment-method reference (``pm_...``); events, read models, workflow
inputs and logs only ever hold the reference. One gateway object serves the
process: the composition root gives it to the use cases as their vault, to the
activities, and to the webhook (:class:`~orderstream.sagas.fulfilment.saga.FulfilmentSaga`).

The sandbox (:class:`SandboxPaymentGateway`) plays both the vault and the
processor. It keeps no state between processes (the API that places the order
and the saga worker that authorises it may be different processes), so its
references carry the token's behaviour, like Stripe's test payment methods
(``pm_card_chargeDeclined``) do, plus a random part:

==================  ====================  =====================================
token               reference             authorisation
==================  ====================  =====================================
``tok_approve``     ``pm_sbx_approve_…``  approved at once
``tok_decline``     ``pm_sbx_decline_…``  declined at once
``tok_pending``     ``pm_sbx_pending_…``  pending: the result arrives later through
                                          the signed webhook
                                          (``POST /payments/{payment_id}/webhook``)
``tok_error``       ``pm_sbx_error_…``    the first ``transient_failures`` calls for
                                          a payment fail with
                                          :class:`PaymentGatewayUnavailable`, then
                                          approved
anything else       ``pm_sbx_unknown_…``  declined ("unknown payment method")
(none on file)      ``""``                declined: orders stored before the vault
                                          existed lost their token on upcasting
==================  ====================  =====================================
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from orderstream.application.payment_vault import PaymentVault
from orderstream.domain.common import Money

AuthorisationStatus = Literal["approved", "declined", "pending"]


@dataclass(frozen=True)
class Authorisation:
    """The processor's answer to an authorisation request."""

    status: AuthorisationStatus
    authorisation_code: str | None = None
    """Set when approved."""
    reason: str | None = None
    """Set when declined."""


class PaymentGatewayUnavailable(Exception):
    """A transient failure (network, 5xx, rate limit): the call may be retried."""


@runtime_checkable  # the webhook route gets it injected, and Litestar checks what it injects
class PaymentGateway(Protocol):
    async def authorise(self, payment_id: str, amount: Money, payment_method: str) -> Authorisation:
        """Hold ``amount`` on the card behind the ``payment_method`` reference.
        Idempotent per payment id."""
        ...

    async def void(self, payment_id: str) -> None:
        """Give an authorisation back (nothing is charged). Idempotent."""
        ...

    async def capture(self, payment_id: str, amount: Money) -> None:
        """Charge an authorised payment. Idempotent."""
        ...

    async def refund(self, payment_id: str, amount: Money) -> None:
        """Pay a captured amount back. Idempotent."""
        ...


class PaymentProvider(PaymentVault, PaymentGateway, Protocol):
    """A payment provider's adapter is both: the vault at ``PlaceOrder`` and the
    gateway of the saga's steps and the webhook (the sandbox, Stripe, Adyen)."""


SANDBOX_TOKENS = ("tok_approve", "tok_decline", "tok_pending", "tok_error")
SANDBOX_PREFIX = "pm_sbx_"


def sandbox_behaviour(payment_method: str) -> str:
    """``pm_sbx_approve_3f...`` -> ``approve``; anything else -> ``""`` (declines)."""
    if not payment_method.startswith(SANDBOX_PREFIX):
        return ""
    return payment_method[len(SANDBOX_PREFIX) :].partition("_")[0]


class SandboxPaymentGateway:
    """In-memory vault and processor for development and tests. No money moves.

    The only state is how often ``tok_error`` authorisations were attempted
    per payment, so a retried activity eventually succeeds.
    """

    def __init__(self, *, transient_failures: int = 2) -> None:
        self.transient_failures = transient_failures
        self._attempts: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        """``(operation, payment_id)`` in call order, for tests and debugging."""

    async def store(self, token: str) -> str:
        behaviour = token.removeprefix("tok_") if token in SANDBOX_TOKENS else "unknown"
        return f"{SANDBOX_PREFIX}{behaviour}_{secrets.token_hex(8)}"

    async def authorise(self, payment_id: str, amount: Money, payment_method: str) -> Authorisation:
        self.calls.append(("authorise", payment_id))
        match sandbox_behaviour(payment_method):
            case "approve":
                return Authorisation("approved", authorisation_code=_code(payment_id))
            case "decline":
                return Authorisation("declined", reason="card declined by the issuer")
            case "pending":
                return Authorisation("pending")
            case "error":
                attempt = self._attempts.get(payment_id, 0) + 1
                self._attempts[payment_id] = attempt
                if attempt <= self.transient_failures:
                    raise PaymentGatewayUnavailable(
                        f"sandbox: simulated gateway outage (attempt {attempt} of payment {payment_id})"
                    )
                return Authorisation("approved", authorisation_code=_code(payment_id))
            case "unknown":
                return Authorisation("declined", reason="unknown payment method")
            case _:
                return Authorisation("declined", reason="no payment method on file")

    async def void(self, payment_id: str) -> None:
        self.calls.append(("void", payment_id))

    async def capture(self, payment_id: str, amount: Money) -> None:
        self.calls.append(("capture", payment_id))

    async def refund(self, payment_id: str, amount: Money) -> None:
        self.calls.append(("refund", payment_id))


def _code(payment_id: str) -> str:
    return "SBX-" + payment_id.replace("-", "")[:10].upper()
