"""The write side's use cases, in the language of the business.

Each method builds a domain command (filling in ``now`` and the ids), and
hands it to the one :class:`CommandHandler`. The API and the saga activities
call these and nothing lower.

Two shortcuts keep the hot paths lean:

- the product stream's commands without ``If-Match`` go through a
  :class:`StreamBatcher`: concurrent reservations of one SKU become one append
  instead of a race (see :mod:`orderstream.application.stream_batcher`);
- placing an order creates its stream without reading it first
  (:meth:`CommandHandler.create`), and prices come from :class:`PriceCache`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from orderstream.application.commands import CommandContext, CommandResult, Commands
from orderstream.application.ids import uuid5_text
from orderstream.application.payment_vault import PaymentVault
from orderstream.application.stream_batcher import StreamBatcher
from orderstream.domain import inventory, orders, payments
from orderstream.domain.common import InvalidCommand, Money

ORDER_ID_NAMESPACE = uuid.UUID("a4a7f2de-3b59-4d0b-8a39-2f1c7e9b6a10")


class UnknownProduct(InvalidCommand):
    """An order line names a SKU that was never registered."""

    code = "unknown-product"

    def __init__(self, sku: str) -> None:
        self.sku = sku
        super().__init__(f"no product with SKU {sku!r}")


@dataclass(frozen=True)
class LineRequest:
    sku: str
    quantity: int


def order_id_for(context: CommandContext) -> str:
    """A new order's id: derived from the idempotency key (scoped by actor) when
    there is one, so a retried POST lands on the same stream; random otherwise."""
    if context.idempotency_key:
        return uuid5_text(ORDER_ID_NAMESPACE, f"{context.actor}\x1f{context.idempotency_key}")
    return str(uuid.uuid4())


class PriceCache:
    """Unit prices and names of registered products, kept in this process.

    Safe because a product's price and name never change once it is registered
    (``inventory.decide`` refuses a second ``RegisterProduct`` and nothing else
    sets them): a cached entry is never stale. Only registered products are
    cached, so an unknown SKU is looked up (and refused) every time and a product
    registered later is found."""

    def __init__(self, handler: Commands) -> None:
        self.handler = handler
        self._products: dict[str, tuple[Money, str]] = {}

    async def price_and_name(self, sku: str) -> tuple[Money, str]:
        found = self._products.get(sku)
        if found is None:
            product = (await self.handler.load(inventory.decider, inventory.stream_name(sku))).state
            if not product.registered or product.price is None:
                raise UnknownProduct(sku)
            found = self._products[sku] = (product.price, product.name)
        return found


class UseCases:
    def __init__(self, handler: Commands, *, vault: PaymentVault | None = None) -> None:
        self.handler = handler
        self.vault = vault
        """Exchanges the card token of a new order for a payment-method reference
        (the composition root's; ``None``: this process places no orders)."""
        self.products = StreamBatcher(handler)
        """The product streams' single writer (commands without ``If-Match``)."""
        self.prices = PriceCache(handler)

    # ------------------------------------------------------------------ products

    async def register_product(
        self, sku: str, name: str, price: Money, context: CommandContext
    ) -> CommandResult[inventory.Product]:
        cmd = inventory.RegisterProduct(sku=sku, name=name, price=price, now=self.handler.clock())
        return await self.handler.handle(inventory.decider, inventory.stream_name(sku), cmd, context=context)

    async def add_stock(
        self, sku: str, quantity: int, context: CommandContext, *, expected: int | None = None
    ) -> CommandResult[inventory.Product]:
        cmd = inventory.AddStock(sku=sku, quantity=quantity, now=self.handler.clock())
        if expected is None:
            return await self.products.handle(
                inventory.decider, inventory.stream_name(sku), cmd, context=context
            )
        return await self.handler.handle(
            inventory.decider, inventory.stream_name(sku), cmd, expected=expected, context=context
        )

    async def reserve_stock(
        self, sku: str, order_id: str, quantity: int, context: CommandContext
    ) -> CommandResult[inventory.Product]:
        cmd = inventory.ReserveStock(sku=sku, order_id=order_id, quantity=quantity, now=self.handler.clock())
        return await self.products.handle(inventory.decider, inventory.stream_name(sku), cmd, context=context)

    async def release_stock(
        self, sku: str, order_id: str, reason: str, context: CommandContext
    ) -> CommandResult[inventory.Product]:
        cmd = inventory.ReleaseStock(sku=sku, order_id=order_id, reason=reason, now=self.handler.clock())
        return await self.products.handle(inventory.decider, inventory.stream_name(sku), cmd, context=context)

    async def commit_stock(
        self, sku: str, order_id: str, context: CommandContext
    ) -> CommandResult[inventory.Product]:
        cmd = inventory.CommitStock(sku=sku, order_id=order_id, now=self.handler.clock())
        return await self.products.handle(inventory.decider, inventory.stream_name(sku), cmd, context=context)

    async def _priced_lines(self, lines: Sequence[LineRequest]) -> tuple[orders.OrderLine, ...]:
        priced = []
        for line in lines:
            price, name = await self.prices.price_and_name(line.sku)
            priced.append(orders.OrderLine(sku=line.sku, quantity=line.quantity, unit_price=price, name=name))
        return tuple(priced)

    # -------------------------------------------------------------------- orders

    async def place_order(
        self,
        *,
        customer_id: str,
        lines: Sequence[LineRequest],
        shipping_address: orders.Address,
        payment_token: str,
        context: CommandContext,
    ) -> CommandResult[orders.Order]:
        """Place an order. The card token goes to the vault and no further: the
        order (its event, the saga's input) holds only the vault's reference."""
        if self.vault is None:
            raise RuntimeError("no payment vault: the composition root passes one (UseCases(vault=...))")
        order_id = order_id_for(context)
        priced = await self._priced_lines(lines)  # an unknown SKU is refused before the vault is asked
        cmd = orders.PlaceOrder(
            order_id=order_id,
            customer_id=customer_id,
            lines=priced,
            shipping_address=shipping_address,
            payment_method_id=await self.vault.store(payment_token),
            now=self.handler.clock(),
        )
        return await self.handler.create(orders.decider, orders.stream_name(order_id), cmd, context=context)

    async def change_order(
        self,
        order_id: str,
        *,
        shipping_address: orders.Address | None,
        lines: Sequence[LineRequest] | None,
        context: CommandContext,
        expected: int | None = None,
    ) -> CommandResult[orders.Order]:
        priced = None if lines is None else await self._priced_lines(lines)
        cmd = orders.ChangeOrder(
            order_id=order_id, shipping_address=shipping_address, lines=priced, now=self.handler.clock()
        )
        return await self.handler.handle(
            orders.decider, orders.stream_name(order_id), cmd, expected=expected, context=context
        )

    async def cancel_order(
        self, order_id: str, reason: str, context: CommandContext, *, expected: int | None = None
    ) -> CommandResult[orders.Order]:
        cmd = orders.CancelOrder(order_id=order_id, reason=reason, now=self.handler.clock())
        return await self.handler.handle(
            orders.decider, orders.stream_name(order_id), cmd, expected=expected, context=context
        )

    async def order_command(
        self, command: orders.OrderCommand, context: CommandContext
    ) -> CommandResult[orders.Order]:
        """Any order command (the saga's steps: reserve marks, confirm, ship, reject)."""
        return await self.handler.handle(
            orders.decider, orders.stream_name(command.order_id), command, context=context
        )

    # ------------------------------------------------------------------ payments

    async def payment_command(
        self, command: payments.PaymentCommand, context: CommandContext
    ) -> CommandResult[payments.Payment]:
        return await self.handler.handle(
            payments.decider, payments.stream_name(command.payment_id), command, context=context
        )
