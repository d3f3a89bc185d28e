"""The product / stock aggregate (stream ``product-{sku}``).

``on_hand`` counts units in the warehouse; a reservation holds units for one
order until it is released (compensation) or committed (shipment, which also
takes the units off ``on_hand``). ``available = on_hand - reserved``.
Reserving is all or nothing for the requested quantity.

Every order of a product goes through this one stream, so its state must not
grow with sales: it keeps the reservations in flight, counters, and each
release for a short window of event time (the guard against a late
reservation for a released order). ``docs/inventory.md`` explains the design
and the alternatives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Annotated, ClassVar, assert_never

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

CLOCK_SKEW = timedelta(seconds=5)
"""How far the clocks of the processes writing one product may disagree (NTP keeps
them within milliseconds; a clock far off breaks the staleness rule below)."""

STALE_AFTER = timedelta(seconds=40)
"""A reservation built this long before the product's newest event is refused as
stale: it comes from an activity attempt that Temporal has timed out (the
saga's ``STEP_TIMEOUT`` is 30 s, and this must stay at least that plus
:data:`CLOCK_SKEW`, or a live attempt could be refused)."""

RELEASE_GUARD = STALE_AFTER + CLOCK_SKEW
"""How long (in event time) a release is remembered. A late reservation for a
released order was built before the release, so once the release is older than
this the reservation is older than :data:`STALE_AFTER` and refused as stale:
the guard never has to remember more than this window of releases."""


class Product(msgspec.Struct, frozen=True, kw_only=True):
    """What deciding needs, and nothing that grows with the number of orders.

    Finished orders leave no trace but two counters; a retried step is answered
    by its idempotency key before the decider runs. What is kept per order:
    the reservations in flight, and each release for :data:`RELEASE_GUARD`
    after it happened (so a late reservation for a released order cannot hold
    stock again: ``docs/inventory.md``)."""

    SNAPSHOT_VERSION: ClassVar[int] = 2
    """2: the bounded state (no sets of finished orders). Bump when ``evolve`` changes."""

    registered: bool = False
    sku: str = ""
    name: str = ""
    price: Money | None = None
    on_hand: int = 0
    reserved: int = 0
    """The sum of ``reservations``, kept as a counter."""
    reservations: Mapping[str, int] = msgspec.field(default_factory=dict)
    """order id -> reserved quantity: the orders in flight."""
    released_at: Mapping[str, datetime] = msgspec.field(default_factory=dict)
    """order id -> when it was released, oldest first; only within
    :data:`RELEASE_GUARD` of ``latest_at``."""
    latest_at: datetime | None = None
    """The newest ``at`` of the product's events: the event-time clock that
    prunes ``released_at`` and judges a reservation stale."""
    orders_committed: int = 0
    """Reservations committed (shipped) so far."""
    orders_released: int = 0
    """Reservations released (given back) so far; a release with nothing held
    is not counted."""

    @property
    def available(self) -> int:
        return self.on_hand - self.reserved

    def is_stale(self, built_at: datetime) -> bool:
        """Whether a command built at ``built_at`` is older than any live attempt."""
        return self.latest_at is not None and built_at < self.latest_at - STALE_AFTER


initial_state = Product()


def evolve(state: Product, event: InventoryEvent) -> Product:
    match event:
        case ProductRegistered():
            return Product(
                registered=True, sku=event.sku, name=event.name, price=event.price, latest_at=event.at
            )
        case StockAdded():
            state = replace(state, on_hand=state.on_hand + event.quantity)
        case StockReserved():
            held = state.reservations.get(event.order_id, 0)
            state = replace(
                state,
                reserved=state.reserved - held + event.quantity,
                reservations={**state.reservations, event.order_id: event.quantity},
            )
        case StockReleased():
            rest, held = _without(state.reservations, event.order_id)
            guard = dict(state.released_at)
            guard.pop(event.order_id, None)  # released again: it moves to the end
            guard[event.order_id] = event.at
            state = replace(
                state,
                reserved=state.reserved - held,
                reservations=rest,
                released_at=guard,
                orders_released=state.orders_released + (1 if held else 0),
            )
        case StockCommitted():
            rest, held = _without(state.reservations, event.order_id)
            state = replace(
                state,
                on_hand=state.on_hand - event.quantity,
                reserved=state.reserved - held,
                reservations=rest,
                orders_committed=state.orders_committed + 1,
            )
        case _:
            assert_never(event)
    return _advance_clock(state, event.at)


def _without(reservations: Mapping[str, int], order_id: str) -> tuple[dict[str, int], int]:
    """The reservations without ``order_id``'s, and what it held (0 if nothing)."""
    rest = dict(reservations)
    return rest, rest.pop(order_id, 0)


def _advance_clock(state: Product, at: datetime) -> Product:
    """Advance ``latest_at`` to ``at`` and forget releases older than the guard.

    ``released_at`` is in append order, which is event-time order up to clock
    skew: pruning stops at the first release still inside the window (a release
    behind it may live a little longer, never shorter)."""
    latest = at if state.latest_at is None or at > state.latest_at else state.latest_at
    horizon = latest - RELEASE_GUARD
    expired = 0
    for released in state.released_at.values():
        if released >= horizon:
            break
        expired += 1
    if not expired and latest == state.latest_at:
        return state
    kept = dict(list(state.released_at.items())[expired:]) if expired else state.released_at
    return replace(state, latest_at=latest, released_at=kept)


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
            return _reserve(command, state)
        case ReleaseStock():
            if command.order_id in state.released_at:
                return []  # released moments ago: compensation is idempotent
            return [
                StockReleased(
                    sku=command.sku,
                    order_id=command.order_id,
                    quantity=state.reservations.get(command.order_id, 0),
                    reason=command.reason,
                    at=command.now,
                )
            ]
        case CommitStock():
            held = state.reservations.get(command.order_id)
            if held is None:
                status = "released" if command.order_id in state.released_at else "not reserved"
                raise IllegalTransition(status, f"commit {command.sku} for order {command.order_id}")
            return [StockCommitted(sku=command.sku, order_id=command.order_id, quantity=held, at=command.now)]
    assert_never(command)


def _reserve(command: ReserveStock, state: Product) -> Sequence[InventoryEvent]:
    """Hold ``command.quantity`` for the order (replacing what it holds), all or nothing.

    Refused for an order released within :data:`RELEASE_GUARD`, and for a
    command built more than :data:`STALE_AFTER` before the product's newest
    event: both are a late attempt of a step the saga has given up on, and
    holding stock for it would leak (nobody would release it again)."""
    if command.quantity < 1:
        raise InvalidCommand(f"{command.sku}: reserve at least 1 unit")
    held = state.reservations.get(command.order_id, 0)
    if held == command.quantity:
        return []  # already done: a retried step changes nothing
    if command.order_id in state.released_at:
        raise IllegalTransition("released", f"reserve {command.sku} again for order {command.order_id}")
    if state.is_stale(command.now):
        raise IllegalTransition(
            "stale",
            f"reserve {command.sku} for order {command.order_id} with a command built at {command.now}",
        )
    available = state.available + held
    if command.quantity > available:
        raise InsufficientStock(command.sku, command.quantity, available)
    return [
        StockReserved(sku=command.sku, order_id=command.order_id, quantity=command.quantity, at=command.now)
    ]


decider: FunctionalDecider[InventoryCommand, InventoryEvent, Product] = FunctionalDecider(
    CATEGORY, initial_state, evolve, decide
)


def stream_name(sku: str) -> str:
    return f"{CATEGORY}-{sku}"
