"""The product / stock decider, as a specification grouped by the state a product starts from."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from orderstream.application.commands import CommandContext, CommandHandler, CommandResult
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
    Product,
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
from orderstream.events import registry
from orderstream.eventstore.sqlite import SqliteEventStore
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

    def test_releasing_with_nothing_reserved_leaves_a_guard_against_a_late_reservation(self) -> None:
        state = (
            given(registered, added(10))
            .when(release())
            .then(StockReleased(sku=SKU, order_id=ORDER, quantity=0, reason="order cancelled", at=NOW))
        )
        assert (state.on_hand, state.reserved, state.orders_released) == (10, 0, 0)
        assert dict(state.released_at) == {ORDER: NOW}

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

    def test_releasing_another_order_guards_that_order_only(self) -> None:
        state = (
            given(*self.history)
            .when(release(OTHER))
            .then(StockReleased(sku=SKU, order_id=OTHER, quantity=0, reason="order cancelled", at=NOW))
        )
        assert (state.reserved, dict(state.reservations), list(state.released_at)) == (4, {ORDER: 4}, [OTHER])

    def test_commit_takes_the_held_units_off_on_hand(self) -> None:
        state = (
            given(*self.history)
            .when(commit())
            .then(StockCommitted(sku=SKU, order_id=ORDER, quantity=4, at=NOW))
        )
        assert (state.on_hand, state.reserved, state.available) == (6, 0, 6)
        assert (dict(state.reservations), dict(state.released_at), state.orders_committed) == ({}, {}, 1)

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
        assert (dict(state.reservations), state.orders_released) == ({}, 1)

    def test_committing_is_refused(self) -> None:
        error = given(*self.history).when(commit()).then_raises(IllegalTransition)
        assert error.status == "released"

    def test_a_late_retried_reservation_does_not_hold_stock_again(self) -> None:
        error = given(*self.history).when(reserve(4)).then_raises(IllegalTransition)
        assert error.status == "released"

    def test_a_late_reservation_after_a_release_of_nothing_is_refused_too(self) -> None:
        """The saga gave up on a hung reserve attempt and compensated before it landed."""
        nothing = released(0)
        error = given(registered, added(10), nothing).when(reserve(4)).then_raises(IllegalTransition)
        assert error.status == "released"


# ============================================================ the release guard's window


def at(offset: timedelta) -> datetime:
    return T1 + offset


def reserve_built_at(built: datetime, quantity: int = 4, order_id: str = ORDER) -> ReserveStock:
    """A reservation command as an attempt that started at ``built`` sends it."""
    return ReserveStock(sku=SKU, order_id=order_id, quantity=quantity, now=built)


class TestReleaseGuardWindow:
    """A release is remembered for ``RELEASE_GUARD`` of event time, then forgotten;
    a reservation built before the release is still refused, as stale."""

    GUARD = inventory.RELEASE_GUARD

    def later_stock(self, offset: timedelta) -> StockAdded:
        return StockAdded(sku=SKU, quantity=1, at=at(offset))

    def test_the_release_is_remembered_until_the_window_has_passed(self) -> None:
        state = given(registered, added(10), reserved(4), released(4), self.later_stock(self.GUARD)).state
        assert list(state.released_at) == [ORDER]

    def test_the_release_is_forgotten_once_an_event_is_later_than_the_window(self) -> None:
        later = self.later_stock(self.GUARD + timedelta(microseconds=1))
        state = given(registered, added(10), reserved(4), released(4), later).state
        assert (dict(state.released_at), state.orders_released, state.available) == ({}, 1, 11)

    def test_a_late_reservation_built_before_a_forgotten_release_is_refused_as_stale(self) -> None:
        later = self.later_stock(self.GUARD + timedelta(seconds=1))
        error = (
            given(registered, added(10), reserved(4), released(4), later)
            .when(reserve_built_at(T1 - timedelta(milliseconds=1)))
            .then_raises(IllegalTransition)
        )
        assert error.status == "stale"

    def test_releases_are_forgotten_oldest_first(self) -> None:
        state = given(
            registered,
            added(10),
            StockReleased(sku=SKU, order_id="a", quantity=0, reason="r", at=at(timedelta(0))),
            StockReleased(sku=SKU, order_id="b", quantity=0, reason="r", at=at(timedelta(seconds=10))),
            StockReleased(sku=SKU, order_id="c", quantity=0, reason="r", at=at(timedelta(seconds=20))),
            self.later_stock(self.GUARD + timedelta(seconds=15)),
        ).state
        assert dict(state.released_at) == {"c": at(timedelta(seconds=20))}

    def test_releasing_an_order_again_after_the_window_guards_it_again(self) -> None:
        later = self.later_stock(self.GUARD + timedelta(seconds=1))
        built = at(self.GUARD + timedelta(seconds=2))
        state = (
            given(registered, added(10), reserved(4), released(4), later)
            .when(ReleaseStock(sku=SKU, order_id=ORDER, reason="again", now=built))
            .then(StockReleased(sku=SKU, order_id=ORDER, quantity=0, reason="again", at=built))
        )
        assert dict(state.released_at) == {ORDER: built}


# ==================================================================== stale commands


class TestStaleReservations:
    """A reservation built more than ``STALE_AFTER`` before the product's newest
    event comes from an attempt Temporal has already given up on."""

    history = (registered, added(10), StockAdded(sku=SKU, quantity=1, at=T1))

    def test_a_reservation_just_inside_the_limit_is_taken(self) -> None:
        built = T1 - inventory.STALE_AFTER
        given(*self.history).when(reserve_built_at(built)).then(reserved(4, at=built))

    def test_a_reservation_older_than_the_limit_is_refused(self) -> None:
        built = T1 - inventory.STALE_AFTER - timedelta(microseconds=1)
        error = given(*self.history).when(reserve_built_at(built)).then_raises(IllegalTransition)
        assert error.status == "stale"

    def test_a_stale_retry_of_a_reservation_already_held_is_nothing(self) -> None:
        built = T1 - inventory.STALE_AFTER - timedelta(seconds=1)
        given(*self.history, reserved(4)).when(reserve_built_at(built)).then_nothing()

    def test_the_limit_outlasts_an_activity_attempt(self) -> None:
        """Temporal's start-to-close timeout ends an attempt before its command is stale."""
        from orderstream.sagas.fulfilment.workflow import STEP_TIMEOUT

        assert inventory.STALE_AFTER >= STEP_TIMEOUT + inventory.CLOCK_SKEW
        assert inventory.RELEASE_GUARD > inventory.STALE_AFTER


# ======================================================================== committed


class TestCommitted:
    """A commit leaves only a counter behind: a retried commit step is answered by
    its idempotency key before the decider runs (see the handler tests below)."""

    history = (registered, added(10), reserved(4), committed(4))

    def test_nothing_of_the_order_is_kept(self) -> None:
        state = given(*self.history).state
        assert (state.on_hand, state.reserved, state.orders_committed) == (6, 0, 1)
        assert (dict(state.reservations), dict(state.released_at)) == ({}, {})

    def test_committing_again_without_the_key_is_refused(self) -> None:
        error = given(*self.history).when(commit()).then_raises(IllegalTransition)
        assert error.status == "not reserved"

    def test_a_reservation_built_long_before_the_commit_is_refused_as_stale(self) -> None:
        commit_later = StockCommitted(sku=SKU, order_id=ORDER, quantity=4, at=NOW)
        built = NOW - inventory.STALE_AFTER - timedelta(seconds=1)
        history = (registered, added(10), reserved(4), commit_later)
        error = given(*history).when(reserve_built_at(built)).then_raises(IllegalTransition)
        assert error.status == "stale"

    def test_releasing_after_commit_gives_nothing_back(self) -> None:
        state = (
            given(*self.history)
            .when(release())
            .then(StockReleased(sku=SKU, order_id=ORDER, quantity=0, reason="order cancelled", at=NOW))
        )
        assert (state.on_hand, state.reserved, state.available) == (6, 0, 6)


# ===================================== retried steps, through the command handler (SQLite)


@pytest.fixture
async def handler(tmp_path: Path) -> AsyncIterator[CommandHandler]:
    store = await SqliteEventStore.open(tmp_path / "events.db")
    try:
        yield CommandHandler(store, registry)
    finally:
        await store.close()


async def _step(
    handler: CommandHandler, command: InventoryCommand, key: str | None
) -> CommandResult[Product]:
    context = CommandContext(actor="saga", idempotency_key=key)
    return await handler.handle(inventory.decider, inventory.stream_name(SKU), command, context=context)


class TestRetriedSteps:
    """What the ``committed`` set used to answer, the step's idempotency key answers now."""

    async def test_a_retried_commit_step_commits_once(self, handler: CommandHandler) -> None:
        for command in (register, add(10), reserve(4)):
            await _step(handler, command, None)
        first = await _step(handler, commit(), "wf-1/commit-stock/BOOK-1")
        again = await _step(handler, commit(), "wf-1/commit-stock/BOOK-1")
        assert (first.replayed, again.replayed, again.revision) == (False, True, first.revision)
        assert (again.state.on_hand, again.state.reserved, again.state.orders_committed) == (6, 0, 1)

    async def test_a_retried_reserve_step_after_the_commit_reserves_nothing(
        self, handler: CommandHandler
    ) -> None:
        for command in (register, add(10)):
            await _step(handler, command, None)
        reserved_once = await _step(handler, reserve(4), "wf-1/reserve-stock/BOOK-1")
        await _step(handler, commit(), "wf-1/commit-stock/BOOK-1")
        again = await _step(handler, reserve(4), "wf-1/reserve-stock/BOOK-1")
        assert (again.replayed, again.revision) == (True, reserved_once.revision)
        loaded = await handler.load(inventory.decider, inventory.stream_name(SKU))
        assert (loaded.state.on_hand, loaded.state.reserved, loaded.revision) == (6, 0, 3)


def test_the_stream_of_a_product() -> None:
    assert inventory.decider.category == "product"
    assert inventory.stream_name(SKU) == "product-BOOK-1"
