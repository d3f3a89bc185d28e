"""The order aggregate (stream ``order-{order_id}``).

Statuses: ``placed`` -> ``stock_reserved`` -> ``payment_authorised`` ->
``confirmed`` -> ``shipped``, or ``rejected`` (stock short) / ``cancelled``.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Literal, assert_never

import msgspec
from msgspec.structs import replace

from orderstream.domain.common import (
    AlreadyExists,
    DomainError,
    FunctionalDecider,
    IllegalTransition,
    InvalidCommand,
    Money,
    NotFound,
    conforming,
)

CATEGORY = "order"
MAX_LINES = 100
MAX_QUANTITY = 10_000

Status = Literal[
    "placed", "stock_reserved", "payment_authorised", "confirmed", "shipped", "rejected", "cancelled"
]
FINAL: frozenset[str] = frozenset({"shipped", "rejected", "cancelled"})

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Sku = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Quantity = Annotated[int, msgspec.Meta(ge=1, le=MAX_QUANTITY)]


# ----------------------------------------------------------------------- value objects


class Address(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Text
    line1: Text
    city: Text
    postal_code: Annotated[str, msgspec.Meta(min_length=1, max_length=20)]
    country: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2")]
    line2: Annotated[str, msgspec.Meta(max_length=200)] | None = None


class OrderLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    sku: Sku
    quantity: Quantity
    unit_price: Money
    name: str | None = None
    """The product's name when the order was placed, recorded so the read side can
    search and show it without a lookup (a lookup would not replay the same after a
    rename). ``None`` on lines recorded before names were (OrderPlaced v2,
    OrderLinesChanged v1)."""

    @property
    def subtotal(self) -> Money:
        return self.unit_price.times(self.quantity)


class StockLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A line as a stock reservation sees it: which product and how many (no price)."""

    sku: str
    quantity: int


def stock_lines(lines: Sequence[OrderLine]) -> tuple[StockLine, ...]:
    return tuple(StockLine(sku=line.sku, quantity=line.quantity) for line in lines)


def same_stock(left: Sequence[StockLine], right: Sequence[StockLine]) -> bool:
    """The same SKUs in the same quantities; the order of the lines does not matter."""
    return sorted((x.sku, x.quantity) for x in left) == sorted((x.sku, x.quantity) for x in right)


def _describe(lines: Sequence[StockLine]) -> str:
    return ", ".join(f"{line.quantity} x {line.sku}" for line in lines) or "nothing"


class LinesChanged(DomainError):
    """``MarkStockReserved`` names other lines than the order has now: the customer
    changed them while the stock was being reserved. Whoever reserved must
    reserve the current lines (``current``) and mark again."""

    code = "lines-changed"

    def __init__(self, order_id: str, reserved: Sequence[StockLine], current: Sequence[StockLine]) -> None:
        self.order_id = order_id
        self.reserved = tuple(reserved)
        self.current = tuple(current)
        super().__init__(
            f"order {order_id}: stock was reserved for {_describe(reserved)}, "
            f"but the order's lines are now {_describe(current)}"
        )


def total_of(lines: Sequence[OrderLine]) -> Money:
    total = Money(0, lines[0].unit_price.currency)
    for line in lines:
        total = total + line.subtotal
    return total


# ----------------------------------------------------------------------------- events


class OrderPlaced(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    customer_id: str
    lines: tuple[OrderLine, ...]
    total: Money
    shipping_address: Address
    payment_method_id: str
    """The vault's reference for the card (``pm_...``), never the card token itself
    (``sagas/fulfilment/payment_gateway.py``). ``""``: none on file (orders stored before
    the vault existed), which the gateway declines."""
    placed_at: datetime


class OrderLinesChanged(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    lines: tuple[OrderLine, ...]
    total: Money
    at: datetime


class OrderShippingAddressChanged(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    shipping_address: Address
    at: datetime


class OrderStockReserved(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    at: datetime


class OrderPaymentAuthorised(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    payment_id: str
    at: datetime


class OrderConfirmed(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    at: datetime


class OrderShipped(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    tracking_number: str
    at: datetime


class OrderRejected(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    reason: str
    at: datetime


class OrderCancelled(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    reason: str
    previous_status: str
    at: datetime


OrderEvent = (
    OrderPlaced
    | OrderLinesChanged
    | OrderShippingAddressChanged
    | OrderStockReserved
    | OrderPaymentAuthorised
    | OrderConfirmed
    | OrderShipped
    | OrderRejected
    | OrderCancelled
)


# --------------------------------------------------------------------------- commands


class PlaceOrder(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    customer_id: str
    lines: tuple[OrderLine, ...]
    shipping_address: Address
    payment_method_id: str
    """The vault's reference (``pm_...``): the use case exchanges the token first."""
    now: datetime


class ChangeOrder(msgspec.Struct, frozen=True, kw_only=True):
    """Change the shipping address and/or the lines; ``None`` leaves a part as it is."""

    order_id: str
    now: datetime
    shipping_address: Address | None = None
    lines: tuple[OrderLine, ...] | None = None


class CancelOrder(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    reason: str
    now: datetime


class MarkStockReserved(msgspec.Struct, frozen=True, kw_only=True):
    """Stock is held for ``lines``; refused with :class:`LinesChanged` unless
    they are the order's current lines (SKU and quantity)."""

    order_id: str
    lines: tuple[StockLine, ...]
    now: datetime


class MarkPaymentAuthorised(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    payment_id: str
    now: datetime


class ConfirmOrder(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    now: datetime


class ShipOrder(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    tracking_number: str
    now: datetime


class RejectOrder(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str
    reason: str
    now: datetime


OrderCommand = (
    PlaceOrder
    | ChangeOrder
    | CancelOrder
    | MarkStockReserved
    | MarkPaymentAuthorised
    | ConfirmOrder
    | ShipOrder
    | RejectOrder
)


# ------------------------------------------------------------------------------ state


class Order(msgspec.Struct, frozen=True, kw_only=True):
    """What decisions need. ``status`` is ``None`` until the order is placed."""

    status: Status | None = None
    order_id: str = ""
    customer_id: str = ""
    lines: tuple[OrderLine, ...] = ()
    total: Money | None = None
    shipping_address: Address | None = None
    payment_id: str | None = None
    cancel_reason: str | None = None


initial_state = Order()


def evolve(state: Order, event: OrderEvent) -> Order:
    match event:
        case OrderPlaced():
            return Order(
                status="placed",
                order_id=event.order_id,
                customer_id=event.customer_id,
                lines=event.lines,
                total=event.total,
                shipping_address=event.shipping_address,
            )
        case OrderLinesChanged():
            return replace(state, lines=event.lines, total=event.total)
        case OrderShippingAddressChanged():
            return replace(state, shipping_address=event.shipping_address)
        case OrderStockReserved():
            return replace(state, status="stock_reserved")
        case OrderPaymentAuthorised():
            return replace(state, status="payment_authorised", payment_id=event.payment_id)
        case OrderConfirmed():
            return replace(state, status="confirmed")
        case OrderShipped():
            return replace(state, status="shipped")
        case OrderRejected():
            return replace(state, status="rejected", cancel_reason=event.reason)
        case OrderCancelled():
            return replace(state, status="cancelled", cancel_reason=event.reason)
    assert_never(event)


def _check_lines(lines: Sequence[OrderLine]) -> None:
    if not lines:
        raise InvalidCommand("an order needs at least one line")
    if len(lines) > MAX_LINES:
        raise InvalidCommand(f"an order has at most {MAX_LINES} lines")
    skus = [line.sku for line in lines]
    if len(set(skus)) != len(skus):
        raise InvalidCommand("each SKU may appear on one line only")
    if len({line.unit_price.currency for line in lines}) != 1:
        raise InvalidCommand("all lines of an order must be in one currency")
    for number, line in enumerate(lines, 1):
        conforming(line, f"line {number}")
    conforming(total_of(lines), "order total")


def _require(state: Order, order_id: str) -> Status:
    if state.status is None:
        raise NotFound("order", order_id)
    return state.status


def decide(command: OrderCommand, state: Order) -> Sequence[OrderEvent]:
    match command:
        case PlaceOrder():
            if state.status is not None:
                raise AlreadyExists("order", command.order_id)
            _check_lines(command.lines)
            conforming(command.shipping_address, "shipping address")
            return [
                OrderPlaced(
                    order_id=command.order_id,
                    customer_id=command.customer_id,
                    lines=command.lines,
                    total=total_of(command.lines),
                    shipping_address=command.shipping_address,
                    payment_method_id=command.payment_method_id,
                    placed_at=command.now,
                )
            ]
        case ChangeOrder():
            status = _require(state, command.order_id)
            if status in FINAL:
                raise IllegalTransition(status, "change the order")
            changes: list[OrderEvent] = []
            if command.lines is not None and command.lines != state.lines:
                if status != "placed":
                    raise IllegalTransition(status, "change the lines")
                _check_lines(command.lines)
                changes.append(
                    OrderLinesChanged(
                        order_id=command.order_id,
                        lines=command.lines,
                        total=total_of(command.lines),
                        at=command.now,
                    )
                )
            if command.shipping_address is not None and command.shipping_address != state.shipping_address:
                conforming(command.shipping_address, "shipping address")
                changes.append(
                    OrderShippingAddressChanged(
                        order_id=command.order_id, shipping_address=command.shipping_address, at=command.now
                    )
                )
            return changes
        case CancelOrder():
            status = _require(state, command.order_id)
            if status in FINAL:
                raise IllegalTransition(status, "cancel")
            return [
                OrderCancelled(
                    order_id=command.order_id, reason=command.reason, previous_status=status, at=command.now
                )
            ]
        case MarkStockReserved():
            status = _require(state, command.order_id)
            if status not in ("placed", "stock_reserved"):
                raise IllegalTransition(status, "mark stock reserved")
            current = stock_lines(state.lines)
            if not same_stock(command.lines, current):
                # The lines changed after the reservation began: the order's
                # lines (what ships, what is charged) and the stock held must agree.
                raise LinesChanged(command.order_id, command.lines, current)
            if status == "stock_reserved":
                return []
            return [OrderStockReserved(order_id=command.order_id, at=command.now)]
        case MarkPaymentAuthorised():
            status = _require(state, command.order_id)
            if status == "payment_authorised" and state.payment_id == command.payment_id:
                return []
            if status != "stock_reserved":
                raise IllegalTransition(status, "mark payment authorised")
            return [
                OrderPaymentAuthorised(
                    order_id=command.order_id, payment_id=command.payment_id, at=command.now
                )
            ]
        case ConfirmOrder():
            status = _require(state, command.order_id)
            if status == "confirmed":
                return []
            if status != "payment_authorised":
                raise IllegalTransition(status, "confirm")
            return [OrderConfirmed(order_id=command.order_id, at=command.now)]
        case ShipOrder():
            status = _require(state, command.order_id)
            if status == "shipped":
                return []
            if status != "confirmed":
                raise IllegalTransition(status, "ship")
            return [
                OrderShipped(
                    order_id=command.order_id, tracking_number=command.tracking_number, at=command.now
                )
            ]
        case RejectOrder():
            status = _require(state, command.order_id)
            if status == "rejected":
                return []
            if status not in ("placed", "stock_reserved"):
                raise IllegalTransition(status, "reject")
            return [OrderRejected(order_id=command.order_id, reason=command.reason, at=command.now)]
    assert_never(command)


decider: FunctionalDecider[OrderCommand, OrderEvent, Order] = FunctionalDecider(
    CATEGORY, initial_state, evolve, decide
)


def stream_name(order_id: str) -> str:
    return f"{CATEGORY}-{order_id}"
