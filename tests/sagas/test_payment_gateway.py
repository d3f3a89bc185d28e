"""The sandbox gateway: a vault that exchanges the card token for a reference
(``pm_...``), and a processor that decides by the reference's behaviour."""

from __future__ import annotations

import pytest

from orderstream.domain.common import Money
from orderstream.sagas.fulfilment.payment_gateway import PaymentGatewayUnavailable, SandboxPaymentGateway

EUR = Money(1250, "EUR")


@pytest.mark.parametrize(
    ("token", "status", "reason"),
    [
        ("tok_approve", "approved", None),
        ("tok_decline", "declined", "card declined by the issuer"),
        ("tok_pending", "pending", None),
        ("tok_unknown", "declined", "unknown payment method"),
        ("4242424242424242", "declined", "unknown payment method"),
    ],
)
async def test_the_reference_keeps_the_tokens_behaviour(token: str, status: str, reason: str | None) -> None:
    gateway = SandboxPaymentGateway()
    reference = await gateway.store(token)
    assert reference.startswith("pm_")
    assert token not in reference
    assert "tok_" not in reference
    answer = await SandboxPaymentGateway().authorise("p1", EUR, reference)  # another process's gateway
    assert (answer.status, answer.reason) == (status, reason)
    if status == "approved":
        assert answer.authorisation_code


async def test_each_exchange_gives_a_new_reference() -> None:
    gateway = SandboxPaymentGateway()
    assert await gateway.store("tok_approve") != await gateway.store("tok_approve")


@pytest.mark.parametrize("payment_method", ["", "tok_approve", "pm_other_approve_1", "pm_sbx_"])
async def test_no_reference_of_the_vault_is_declined(payment_method: str) -> None:
    """No payment method on file (old orders whose token was dropped), a raw token
    or a foreign reference: never approved blindly."""
    answer = await SandboxPaymentGateway().authorise("p1", EUR, payment_method)
    assert answer.status == "declined"


async def test_tok_error_fails_the_first_calls_per_payment_then_approves() -> None:
    gateway = SandboxPaymentGateway(transient_failures=2)
    reference = await gateway.store("tok_error")
    for _ in range(2):
        with pytest.raises(PaymentGatewayUnavailable):
            await gateway.authorise("p1", EUR, reference)
    assert (await gateway.authorise("p1", EUR, reference)).status == "approved"
    with pytest.raises(PaymentGatewayUnavailable):  # counted per payment
        await gateway.authorise("p2", EUR, reference)
