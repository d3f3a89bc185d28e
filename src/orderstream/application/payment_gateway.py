"""The payment gateway port, and the sandbox gateway that decides by token.

The saga's activities talk to a card processor through :class:`PaymentGateway`
only; a real processor (Stripe, Adyen, ...) plugs in behind the same four
calls. Every call is keyed by the payment id, which a real adapter sends as the
processor's idempotency key: a retried activity must not charge twice.

The sandbox (:class:`SandboxPaymentGateway`) decides by the payment token, as
the service's design says:

==================  ===========================================================
``tok_approve``     approved at once
``tok_decline``     declined at once
``tok_pending``     pending: the result arrives later through the webhook
                    (``POST /payments/{payment_id}/webhook``)
``tok_error``       the first ``transient_failures`` calls for a payment fail
                    with :class:`PaymentGatewayUnavailable`, then approved
anything else       declined ("unknown payment token"), the empty token too
==================  ===========================================================
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

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


class PaymentGateway(Protocol):
    async def authorise(self, payment_id: str, amount: Money, token: str) -> Authorisation:
        """Hold ``amount`` on the card behind ``token``. Idempotent per payment id."""
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


PAYMENT_GATEWAY_KEY = "payment_gateway"
"""Where the process's gateway sits in ``container.extensions``: the saga worker's
activities and the webhook (which voids an authorisation that came after the
void) use the same one. Unset: the sandbox."""


def shared_gateway(
    extensions: MutableMapping[str, Any], gateway: PaymentGateway | None = None
) -> PaymentGateway:
    """The process's gateway in ``extensions`` (a container's): ``gateway`` if
    given (it becomes the shared one), else the one already there, else a new
    sandbox (kept there)."""
    if gateway is not None:
        extensions[PAYMENT_GATEWAY_KEY] = gateway
        return gateway
    found: PaymentGateway = extensions.setdefault(PAYMENT_GATEWAY_KEY, SandboxPaymentGateway())
    return found


SANDBOX_TOKENS = ("tok_approve", "tok_decline", "tok_pending", "tok_error")


class SandboxPaymentGateway:
    """In-memory processor for development and tests. No money moves.

    The only state is how often ``tok_error`` authorisations were attempted
    per payment, so a retried activity eventually succeeds.
    """

    def __init__(self, *, transient_failures: int = 2) -> None:
        self.transient_failures = transient_failures
        self._attempts: dict[str, int] = {}
        self.calls: list[tuple[str, str]] = []
        """``(operation, payment_id)`` in call order, for tests and debugging."""

    async def authorise(self, payment_id: str, amount: Money, token: str) -> Authorisation:
        self.calls.append(("authorise", payment_id))
        match token:
            case "tok_approve":
                return Authorisation("approved", authorisation_code=_code(payment_id))
            case "tok_decline":
                return Authorisation("declined", reason="card declined by the issuer")
            case "tok_pending":
                return Authorisation("pending")
            case "tok_error":
                attempt = self._attempts.get(payment_id, 0) + 1
                self._attempts[payment_id] = attempt
                if attempt <= self.transient_failures:
                    raise PaymentGatewayUnavailable(
                        f"sandbox: simulated gateway outage (attempt {attempt} of payment {payment_id})"
                    )
                return Authorisation("approved", authorisation_code=_code(payment_id))
            case _:
                return Authorisation("declined", reason="unknown payment token")

    async def void(self, payment_id: str) -> None:
        self.calls.append(("void", payment_id))

    async def capture(self, payment_id: str, amount: Money) -> None:
        self.calls.append(("capture", payment_id))

    async def refund(self, payment_id: str, amount: Money) -> None:
        self.calls.append(("refund", payment_id))


def _code(payment_id: str) -> str:
    return "SBX-" + payment_id.replace("-", "")[:10].upper()
