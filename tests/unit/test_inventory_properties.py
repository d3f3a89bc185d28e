"""Properties of the stock decider over random command sequences (hypothesis).

Whatever commands arrive, in whatever order, and whichever of them the domain
refuses: ``available`` never goes negative, ``reserved`` is the sum of the
reservations the events hold, ``on_hand`` is what was added minus what was
committed, and a release or commit moves exactly the quantity that was held.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import pytest

pytest.importorskip("hypothesis")

from hypothesis import given, settings
from hypothesis import strategies as st

from orderstream.domain import inventory
from orderstream.domain.common import DomainError, Money
from orderstream.domain.inventory import (
    AddStock,
    CommitStock,
    InsufficientStock,
    InventoryCommand,
    InventoryEvent,
    Product,
    ProductRegistered,
    ReleaseStock,
    ReserveStock,
    StockAdded,
    StockCommitted,
    StockReleased,
    StockReserved,
)

SKU = "BOOK-1"
NOW = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
ORDERS = st.sampled_from(["ord-1", "ord-2", "ord-3", "ord-4"])

commands: st.SearchStrategy[InventoryCommand] = st.one_of(
    st.builds(AddStock, sku=st.just(SKU), quantity=st.integers(-2, 40), now=st.just(NOW)),
    st.builds(
        ReserveStock, sku=st.just(SKU), order_id=ORDERS, quantity=st.integers(-2, 30), now=st.just(NOW)
    ),
    st.builds(
        ReleaseStock, sku=st.just(SKU), order_id=ORDERS, reason=st.just("compensation"), now=st.just(NOW)
    ),
    st.builds(CommitStock, sku=st.just(SKU), order_id=ORDERS, now=st.just(NOW)),
)


def attempt(command: InventoryCommand, state: Product) -> Sequence[InventoryEvent] | DomainError:
    """The events decided, or the domain error that refused the command."""
    try:
        return inventory.decide(command, state)
    except DomainError as error:
        return error


@settings(max_examples=500, derandomize=True, database=None)
@given(st.lists(commands, max_size=40))
def test_stock_invariants_hold_for_any_command_sequence(sequence: list[InventoryCommand]) -> None:
    state = inventory.evolve(
        inventory.initial_state, ProductRegistered(sku=SKU, name="x", price=Money(100, "EUR"), at=NOW)
    )
    held: dict[str, int] = {}  # rebuilt from the events alone
    added = taken = 0

    for command in sequence:
        events = attempt(command, state)
        if isinstance(events, InsufficientStock):  # all or nothing, and it says why
            assert isinstance(command, ReserveStock)
            assert events.requested == command.quantity
            assert events.available == state.available + held.get(command.order_id, 0) < command.quantity
            continue
        if isinstance(events, DomainError):
            continue

        for event in events:
            match event:
                case StockAdded():
                    added += event.quantity
                case StockReserved():
                    held[event.order_id] = event.quantity
                case StockReleased():
                    assert event.quantity == held.pop(event.order_id)
                case StockCommitted():
                    assert event.quantity == held.pop(event.order_id)
                    taken += event.quantity
                case _:
                    pytest.fail(f"unexpected {event!r}")
            state = inventory.evolve(state, event)

        assert state.available >= 0
        assert state.reserved == sum(held.values())
        assert dict(state.reservations) == held
        assert all(quantity >= 1 for quantity in held.values())
        assert state.on_hand == added - taken
        assert not state.committed & held.keys(), "a committed order still holds stock"


@settings(max_examples=200, derandomize=True, database=None)
@given(st.lists(commands, max_size=40))
def test_every_command_is_idempotent_once_it_succeeded_except_adding_stock(
    sequence: list[InventoryCommand],
) -> None:
    """A retried reserve / release / commit (same command, right after) decides nothing."""
    state = inventory.evolve(
        inventory.initial_state, ProductRegistered(sku=SKU, name="x", price=Money(100, "EUR"), at=NOW)
    )
    for command in sequence:
        events = attempt(command, state)
        if isinstance(events, DomainError):
            continue
        for event in events:
            state = inventory.evolve(state, event)
        if not isinstance(command, AddStock):
            assert list(inventory.decide(command, state)) == []
