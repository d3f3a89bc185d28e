"""The product / stock aggregate (stream ``product-{sku}``).

``on_hand`` counts units in the warehouse; a reservation holds units for one
order until it is released (compensation) or committed (shipment, which also
takes the units off ``on_hand``). ``available = on_hand - reserved``.
Reserving is all or nothing for the requested quantity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Annotated, assert_never

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

CATEGORY = "product"
MAX_STOCK_ADD = 1_000_000
MAX_ON_HAND = 1_000_000_000

Sku = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]


class InsufficientStock(DomainError):
    code = "insufficient-stock"

    def __init__(self, sku: str, requested: int, available: int) -> None:
        self.sku = sku
        self.requested = requested
        self.available = available
        super().__init__(f"{sku}: {requested} requested, {available} available")


class StockLimitExceeded(DomainError):
    code = "stock-limit-exceeded"

    def __init__(self, sku: str, on_hand: int, adding: int) -> None:
        super().__init__(f"{sku}: {on_hand} on hand + {adding} would exceed {MAX_ON_HAND}")


# ----------------------------------------------------------------------------- events


class ProductRegistered(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    name: str
    price: Money
    at: datetime


class StockAdded(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    quantity: int
    at: datetime


class StockReserved(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    order_id: str
    quantity: int
    at: datetime


class StockReleased(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    order_id: str
    quantity: int
    reason: str
    at: datetime


class StockCommitted(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    order_id: str
    quantity: int
    at: datetime


InventoryEvent = ProductRegistered | StockAdded | StockReserved | StockReleased | StockCommitted


# --------------------------------------------------------------------------- commands


class RegisterProduct(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    name: str
    price: Money
    now: datetime


class AddStock(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    quantity: int
    now: datetime


class ReserveStock(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    order_id: str
    quantity: int
    now: datetime


class ReleaseStock(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    order_id: str
    reason: str
    now: datetime


class CommitStock(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    order_id: str
    now: datetime


InventoryCommand = RegisterProduct | AddStock | ReserveStock | ReleaseStock | CommitStock


# ------------------------------------------------------------------------------ state


class Product(msgspec.Struct, frozen=True, kw_only=True):
    registered: bool = False
    sku: str = ""
    name: str = ""
    price: Money | None = None
    on_hand: int = 0
    reservations: Mapping[str, int] = msgspec.field(default_factory=dict)
    """order id -> reserved quantity"""
    committed: frozenset[str] = frozenset()
    """order ids whose reservation was committed (shipped)"""
    released: frozenset[str] = frozenset()
    """order ids whose reservation was released (compensated): a late, retried
    reservation for them must not hold stock again"""

    @property
    def reserved(self) -> int:
        return sum(self.reservations.values())

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved


initial_state = Product()


def evolve(state: Product, event: InventoryEvent) -> Product:
    match event:
        case ProductRegistered():
            return Product(registered=True, sku=event.sku, name=event.name, price=event.price)
        case StockAdded():
            return replace(state, on_hand=state.on_hand + event.quantity)
        case StockReserved():
            return replace(state, reservations={**state.reservations, event.order_id: event.quantity})
        case StockReleased():
            rest = {k: v for k, v in state.reservations.items() if k != event.order_id}
            return replace(state, reservations=rest, released=state.released | {event.order_id})
        case StockCommitted():
            rest = {k: v for k, v in state.reservations.items() if k != event.order_id}
            return replace(
                state,
                on_hand=state.on_hand - event.quantity,
                reservations=rest,
                committed=state.committed | {event.order_id},
            )
    assert_never(event)


def decide(command: InventoryCommand, state: Product) -> Sequence[InventoryEvent]:
    match command:
        case RegisterProduct():
            if state.registered:
                raise AlreadyExists("product", command.sku)
            conforming(command.price, "price")
            return [
                ProductRegistered(sku=command.sku, name=command.name, price=command.price, at=command.now)
            ]
        case _ if not state.registered:
            raise NotFound("product", command.sku)
        case AddStock():
            if not 1 <= command.quantity <= MAX_STOCK_ADD:
                raise InvalidCommand(f"{command.sku}: add between 1 and {MAX_STOCK_ADD} units at a time")
            if state.on_hand + command.quantity > MAX_ON_HAND:
                raise StockLimitExceeded(command.sku, state.on_hand, command.quantity)
            return [StockAdded(sku=command.sku, quantity=command.quantity, at=command.now)]
        case ReserveStock():
            if command.quantity < 1:
                raise InvalidCommand(f"{command.sku}: reserve at least 1 unit")
            held = state.reservations.get(command.order_id)
            if held == command.quantity or command.order_id in state.committed:
                return []  # already done: a retried step changes nothing
            if command.order_id in state.released:
                raise IllegalTransition(
                    "released", f"reserve {command.sku} again for order {command.order_id}"
                )
            available = state.available + (held or 0)
            if command.quantity > available:
                raise InsufficientStock(command.sku, command.quantity, available)
            return [
                StockReserved(
                    sku=command.sku, order_id=command.order_id, quantity=command.quantity, at=command.now
                )
            ]
        case ReleaseStock():
            held = state.reservations.get(command.order_id)
            if held is None:
                return []  # nothing reserved (or already released): compensation is idempotent
            return [
                StockReleased(
                    sku=command.sku,
                    order_id=command.order_id,
                    quantity=held,
                    reason=command.reason,
                    at=command.now,
                )
            ]
        case CommitStock():
            if command.order_id in state.committed:
                return []
            held = state.reservations.get(command.order_id)
            if held is None:
                raise IllegalTransition("not reserved", f"commit {command.sku} for order {command.order_id}")
            return [StockCommitted(sku=command.sku, order_id=command.order_id, quantity=held, at=command.now)]
    assert_never(command)


decider: FunctionalDecider[InventoryCommand, InventoryEvent, Product] = FunctionalDecider(
    CATEGORY, initial_state, evolve, decide
)


def stream_name(sku: str) -> str:
    return f"{CATEGORY}-{sku}"
