"""The product / stock decider, as a specification grouped by the state a product starts from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from orderstream.domain import inventory
from orderstream.domain.common import (
    AlreadyExists,
    IllegalTransition,
    InvalidCommand,
    Money,
    NotFound,
)
from orderstream.domain.inventory import (
    AddStock,
    CommitStock,
    InsufficientStock,
    InventoryCommand,
    ProductRegistered,
    RegisterProduct,
    ReleaseStock,
    ReserveStock,
    StockAdded,
    StockCommitted,
    StockLimitExceeded,
    StockReleased,
    StockReserved,
)
from tests.unit.given_when_then import spec

given = spec(inventory.decider).given

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=1)
NOW = T0 + timedelta(hours=1)

SKU = "BOOK-1"
PRICE = Money(1250, "EUR")
ORDER = "ord-1"
OTHER = "ord-2"

# ------------------------------------------------------------------------- history

registered = ProductRegistered(sku=SKU, name="The Analytical Engine", price=PRICE, at=T0)


def added(quantity: int) -> StockAdded:
    return StockAdded(sku=SKU, quantity=quantity, at=T0)


def reserved(quantity: int, order_id: str = ORDER, at: datetime = T1) -> StockReserved:
    return StockReserved(sku=SKU, order_id=order_id, quantity=quantity, at=at)


def committed(quantity: int, order_id: str = ORDER) -> StockCommitted:
    return StockCommitted(sku=SKU, order_id=order_id, quantity=quantity, at=T1)


def released(quantity: int, order_id: str = ORDER) -> StockReleased:
    return StockReleased(sku=SKU, order_id=order_id, quantity=quantity, reason="payment declined", at=T1)


# ------------------------------------------------------------------------ commands

register = RegisterProduct(sku=SKU, name="The Analytical Engine", price=PRICE, now=NOW)


def add(quantity: int) -> AddStock:
    return AddStock(sku=SKU, quantity=quantity, now=NOW)


def reserve(quantity: int, order_id: str = ORDER) -> ReserveStock:
    return ReserveStock(sku=SKU, order_id=order_id, quantity=quantity, now=NOW)


def release(order_id: str = ORDER) -> ReleaseStock:
    return ReleaseStock(sku=SKU, order_id=order_id, reason="order cancelled", now=NOW)


def commit(order_id: str = ORDER) -> CommitStock:
    return CommitStock(sku=SKU, order_id=order_id, now=NOW)


# ================================================================== no product yet


class TestNoProductYet:
    def test_a_product_can_be_registered(self) -> None:
        state = (
            given()
            .when(register)
            .then(ProductRegistered(sku=SKU, name="The Analytical Engine", price=PRICE, at=NOW))
        )
        assert (state.registered, state.on_hand, state.reserved, state.available) == (True, 0, 0, 0)

    @pytest.mark.parametrize(
        "price",
        [Money(-1, "EUR"), Money(10**12 + 1, "EUR"), Money(100, "eur")],
        ids=["negative", "huge", "eur"],
    )
    def test_a_product_with_an_invalid_price_is_refused(self, price: Money) -> None:
        given().when(RegisterProduct(sku=SKU, name="x", price=price, now=NOW)).then_raises(InvalidCommand)

    @pytest.mark.parametrize(
        "command", [add(1), reserve(1), release(), commit()], ids=lambda c: type(c).__name__
    )
    def test_any_other_command_needs_the_product(self, command: InventoryCommand) -> None:
        error = given().when(command).then_raises(NotFound)
        assert (error.what, error.ident) == ("product", SKU)


# ======================================================================= registered


class TestRegistered:
    def test_registering_it_again_is_refused(self) -> None:
        given(registered).when(register).then_raises(AlreadyExists)

    def test_stock_can_be_added(self) -> None:
        state = given(registered, added(5)).when(add(7)).then(StockAdded(sku=SKU, quantity=7, at=NOW))
        assert (state.on_hand, state.available) == (12, 12)

    def test_stock_can_be_added_up_to_the_limit(self) -> None:
        to_limit = inventory.MAX_ON_HAND - inventory.MAX_STOCK_ADD
        given(registered, added(to_limit)).when(add(inventory.MAX_STOCK_ADD)).then(
            StockAdded(sku=SKU, quantity=inventory.MAX_STOCK_ADD, at=NOW)
        )

    def test_stock_beyond_the_limit_is_refused(self) -> None:
        given(registered, added(inventory.MAX_ON_HAND)).when(add(1)).then_raises(StockLimitExceeded)

    @pytest.mark.parametrize("quantity", [0, -1, inventory.MAX_STOCK_ADD + 1])
    def test_adding_a_quantity_out_of_range_is_refused(self, quantity: int) -> None:
        given(registered, added(10)).when(add(quantity)).then_raises(InvalidCommand)

    def test_stock_can_be_reserved_for_an_order(self) -> None:
        state = given(registered, added(10)).when(reserve(4)).then(reserved(4, at=NOW))
        assert (state.on_hand, state.reserved, state.available) == (10, 4, 6)

    def test_all_available_stock_can_be_reserved(self) -> None:
        given(registered, added(10)).when(reserve(10)).then(reserved(10, at=NOW))

    def test_reserving_more_than_available_reserves_nothing(self) -> None:
        error = given(registered, added(3)).when(reserve(5)).then_raises(InsufficientStock)
        assert (error.sku, error.requested, error.available) == (SKU, 5, 3)

    def test_reserving_without_stock_says_none_is_available(self) -> None:
        error = given(registered).when(reserve(1)).then_raises(InsufficientStock)
        assert (error.requested, error.available) == (1, 0)

    @pytest.mark.parametrize("quantity", [0, -3])
    def test_reserving_a_quantity_below_one_is_refused(self, quantity: int) -> None:
        given(registered, added(10)).when(reserve(quantity)).then_raises(InvalidCommand)

    def test_releasing_with_nothing_reserved_is_nothing(self) -> None:
        given(registered, added(10)).when(release()).then_nothing()

    def test_committing_without_a_reservation_is_refused(self) -> None:
        given(registered, added(10)).when(commit()).then_raises(IllegalTransition)


# ==================================================================== stock reserved


class TestStockReserved:
    history = (registered, added(10), reserved(4))

    def test_reserving_again_the_same_quantity_is_nothing(self) -> None:
        given(*self.history).when(reserve(4)).then_nothing()

    def test_reserving_again_another_quantity_replaces_the_reservation(self) -> None:
        state = given(*self.history).when(reserve(7)).then(reserved(7, at=NOW))
        assert (state.reserved, state.available) == (7, 3)

    def test_a_new_quantity_may_use_what_the_order_already_holds(self) -> None:
        given(*self.history).when(reserve(10)).then(reserved(10, at=NOW))

    def test_a_new_quantity_beyond_what_is_held_and_available_is_refused(self) -> None:
        error = given(*self.history).when(reserve(11)).then_raises(InsufficientStock)
        assert (error.requested, error.available) == (11, 10)

    def test_another_order_can_reserve_what_is_still_available(self) -> None:
        state = given(*self.history).when(reserve(6, OTHER)).then(reserved(6, OTHER, at=NOW))
        assert (state.reserved, state.available) == (10, 0)

    def test_another_order_cannot_reserve_what_is_held(self) -> None:
        error = given(*self.history).when(reserve(7, OTHER)).then_raises(InsufficientStock)
        assert (error.requested, error.available) == (7, 6)

    def test_release_gives_back_exactly_what_was_held(self) -> None:
        state = (
            given(*self.history, reserved(2, OTHER))
            .when(release())
            .then(StockReleased(sku=SKU, order_id=ORDER, quantity=4, reason="order cancelled", at=NOW))
        )
        assert (state.on_hand, state.reserved, state.available) == (10, 2, 8)
        assert dict(state.reservations) == {OTHER: 2}

    def test_releasing_another_order_is_nothing(self) -> None:
        given(*self.history).when(release(OTHER)).then_nothing()

    def test_commit_takes_the_held_units_off_on_hand(self) -> None:
        state = (
            given(*self.history)
            .when(commit())
            .then(StockCommitted(sku=SKU, order_id=ORDER, quantity=4, at=NOW))
        )
        assert (state.on_hand, state.reserved, state.available) == (6, 0, 6)
        assert ORDER in state.committed

    def test_adding_stock_does_not_touch_reservations(self) -> None:
        state = given(*self.history).when(add(5)).then(StockAdded(sku=SKU, quantity=5, at=NOW))
        assert (state.on_hand, state.reserved, state.available) == (15, 4, 11)


# ========================================================================= released


class TestReleased:
    history = (registered, added(10), reserved(4), released(4))

    def test_releasing_again_is_nothing(self) -> None:
        given(*self.history).when(release()).then_nothing()

    def test_everything_is_available_again(self) -> None:
        state = given(*self.history).state
        assert (state.on_hand, state.reserved, state.available) == (10, 0, 10)

    def test_committing_is_refused(self) -> None:
        given(*self.history).when(commit()).then_raises(IllegalTransition)

    def test_a_late_retried_reservation_does_not_hold_stock_again(self) -> None:
        given(*self.history).when(reserve(4)).then_raises(IllegalTransition)


# ======================================================================== committed


class TestCommitted:
    history = (registered, added(10), reserved(4), committed(4))

    def test_committing_again_is_nothing(self) -> None:
        given(*self.history).when(commit()).then_nothing()

    @pytest.mark.parametrize("quantity", [4, 2, 50])
    def test_reserving_after_commit_is_nothing(self, quantity: int) -> None:
        given(*self.history).when(reserve(quantity)).then_nothing()

    def test_releasing_after_commit_is_nothing(self) -> None:
        given(*self.history).when(release()).then_nothing()


def test_the_stream_of_a_product() -> None:
    assert inventory.decider.category == "product"
    assert inventory.stream_name(SKU) == "product-BOOK-1"
