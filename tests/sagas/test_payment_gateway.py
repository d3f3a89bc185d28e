"""The sandbox gateway decides by token (DESIGN.md)."""

from __future__ import annotations

import pytest

from orderstream.application.payment_gateway import PaymentGatewayUnavailable, SandboxPaymentGateway
from orderstream.domain.common import Money

EUR = Money(1250, "EUR")


@pytest.mark.parametrize(
    ("token", "status"),
    [
        ("tok_approve", "approved"),
        ("tok_decline", "declined"),
        ("tok_pending", "pending"),
        ("", "declined"),
        ("tok_unknown", "declined"),
    ],
)
async def test_token_decides(token: str, status: str) -> None:
    answer = await SandboxPaymentGateway().authorise("p1", EUR, token)
    assert answer.status == status
    if status == "approved":
        assert answer.authorisation_code
    if status == "declined":
        assert answer.reason


async def test_tok_error_fails_the_first_calls_per_payment_then_approves() -> None:
    gateway = SandboxPaymentGateway(transient_failures=2)
    for _ in range(2):
        with pytest.raises(PaymentGatewayUnavailable):
            await gateway.authorise("p1", EUR, "tok_error")
    assert (await gateway.authorise("p1", EUR, "tok_error")).status == "approved"
    with pytest.raises(PaymentGatewayUnavailable):  # counted per payment
        await gateway.authorise("p2", EUR, "tok_error")
