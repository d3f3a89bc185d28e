"""The payment vault port: where placing an order exchanges the card token.

The token a client sends when it places an order is a secret (whoever holds it
can charge the card). The vault exchanges it, once, at ``PlaceOrder``, for a
payment-method reference (``pm_...``): an id that is useless without the
merchant's credentials at the processor, the way Stripe's PaymentMethods and
Adyen's stored-payment references work. Events, read models, workflow inputs and
logs only ever hold the reference.

The payment provider's adapter implements it; the composition root passes it to
:class:`~orderstream.application.use_cases.UseCases` (the sandbox:
``orderstream.sagas.fulfilment.payment_gateway.SandboxPaymentGateway``, which is
also the saga's payment gateway).
"""

from __future__ import annotations

from typing import Protocol


class PaymentVault(Protocol):
    async def store(self, token: str) -> str:
        """Exchange a card token for a payment-method reference (``pm_...``).

        The token is not kept anywhere on our side; only the reference is."""
        ...
