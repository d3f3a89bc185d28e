"""The order decider, as a specification grouped by the state an order starts from."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from orderstream.domain import orders
from orderstream.domain.common import AlreadyExists, IllegalTransition, InvalidCommand, Money, NotFound
from orderstream.domain.orders import (
    Address,
    CancelOrder,
    ChangeOrder,
    ConfirmOrder,
    LinesChanged,
    MarkPaymentAuthorised,
    MarkStockReserved,
    OrderCancelled,
    OrderCommand,
    OrderConfirmed,
    OrderLine,
    OrderLinesChanged,
    OrderPaymentAuthorised,
    OrderPlaced,
    OrderRejected,
    OrderShipped,
    OrderShippingAddressChanged,
    OrderStockReserved,
    PlaceOrder,
    RejectOrder,
    ShipOrder,
    StockLine,
)
from tests.unit.given_when_then import spec

given = spec(orders.decider).given

T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=1)
T2 = T0 + timedelta(minutes=2)
NOW = T0 + timedelta(hours=1)

ORDER = "ord-1"
CUSTOMER = "cust-1"
PAYMENT = "pay-1"
PAYMENT_METHOD = "pm_sbx_approve_0a1b2c3d"


def eur(amount: int) -> Money:
    return Money(amount, "EUR")


def line(sku: str, quantity: int, unit_price: int, currency: str = "EUR") -> OrderLine:
    return OrderLine(sku=sku, quantity=quantity, unit_price=Money(unit_price, currency))


HOME = Address(
    name="Ada Lovelace", line1="12 St James's Square", city="London", postal_code="SW1Y 4JH", country="GB"
)
OFFICE = Address(
    name="Ada Lovelace",
    line1="1 Analytical Row",
    line2="Floor 2",
    city="Paris",
    postal_code="75001",
    country="FR",
)
LINES = (line("BOOK-1", 2, 1250), line("PEN-7", 1, 999))  # 2 * 12.50 + 9.99 = 34.99
NEW_LINES = (line("BOOK-1", 1, 1250), line("MUG-3", 3, 800))  # 12.50 + 3 * 8.00 = 36.50

# ------------------------------------------------------------------------- history

placed = OrderPlaced(
    order_id=ORDER,
    customer_id=CUSTOMER,
    lines=LINES,
    total=eur(3499),
    shipping_address=HOME,
    payment_method_id=PAYMENT_METHOD,
    placed_at=T0,
)
stock_reserved = OrderStockReserved(order_id=ORDER, at=T1)
payment_authorised = OrderPaymentAuthorised(order_id=ORDER, payment_id=PAYMENT, at=T1)
confirmed = OrderConfirmed(order_id=ORDER, at=T1)
shipped = OrderShipped(order_id=ORDER, tracking_number="TRACK-1", at=T2)
rejected = OrderRejected(order_id=ORDER, reason="out of stock: PEN-7", at=T1)
cancelled = OrderCancelled(order_id=ORDER, reason="changed my mind", previous_status="placed", at=T1)

# ------------------------------------------------------------------------ commands

place = PlaceOrder(
    order_id=ORDER,
    customer_id=CUSTOMER,
    lines=LINES,
    shipping_address=HOME,
    payment_method_id=PAYMENT_METHOD,
    now=NOW,
)
change_lines = ChangeOrder(order_id=ORDER, lines=NEW_LINES, now=NOW)
change_address = ChangeOrder(order_id=ORDER, shipping_address=OFFICE, now=NOW)
cancel = CancelOrder(order_id=ORDER, reason="no longer needed", now=NOW)
mark_stock_reserved = MarkStockReserved(order_id=ORDER, lines=orders.stock_lines(LINES), now=NOW)
mark_payment_authorised = MarkPaymentAuthorised(order_id=ORDER, payment_id=PAYMENT, now=NOW)
confirm = ConfirmOrder(order_id=ORDER, now=NOW)
ship = ShipOrder(order_id=ORDER, tracking_number="TRACK-9", now=NOW)
reject = RejectOrder(order_id=ORDER, reason="out of stock: BOOK-1", now=NOW)


def marking(*lines: tuple[str, int]) -> MarkStockReserved:
    """``MarkStockReserved`` for these ``(sku, quantity)`` lines."""
    reserved = tuple(StockLine(sku=sku, quantity=quantity) for sku, quantity in lines)
    return MarkStockReserved(order_id=ORDER, lines=reserved, now=NOW)


lines_changed = OrderLinesChanged(order_id=ORDER, lines=NEW_LINES, total=eur(3650), at=T1)


def placing(lines: tuple[OrderLine, ...], address: Address = HOME) -> PlaceOrder:
    return PlaceOrder(
        order_id=ORDER,
        customer_id=CUSTOMER,
        lines=lines,
        shipping_address=address,
        payment_method_id=PAYMENT_METHOD,
        now=NOW,
    )


def many_lines(count: int) -> tuple[OrderLine, ...]:
    return tuple(line(f"SKU-{i}", 1, 100) for i in range(count))


def cancelled_from(status: str) -> OrderCancelled:
    return OrderCancelled(order_id=ORDER, reason=cancel.reason, previous_status=status, at=NOW)


def ids(command: OrderCommand) -> str:
    """A readable test id: the command's name (and, for ChangeOrder, what it changes)."""
    if isinstance(command, ChangeOrder):
        return "ChangeOrder(" + ("lines" if command.lines is not None else "address") + ")"
    return type(command).__name__


INVALID_LINES = {
    "no lines": (),
    "more than 100 lines": many_lines(orders.MAX_LINES + 1),
    "the same SKU twice": (line("BOOK-1", 1, 1250), line("BOOK-1", 2, 1250)),
    "mixed currencies": (line("BOOK-1", 1, 1250), line("PEN-7", 1, 999, "USD")),
    "a quantity of zero": (line("BOOK-1", 0, 1250),),
    "a negative quantity": (line("BOOK-1", -1, 1250),),
    "a quantity over the limit": (line("BOOK-1", orders.MAX_QUANTITY + 1, 1250),),
    "a malformed SKU": (line("not a sku!", 1, 1250),),
    "a negative price": (line("BOOK-1", 1, -1),),
    "a malformed currency": (line("BOOK-1", 1, 1250, "euro"),),
    "a total over the money limit": (
        line("GOLD-1", orders.MAX_QUANTITY, 10**9),  # 10^13 minor units, more than MinorUnits allows
    ),
}


# ===================================================================== no order yet


class TestNoOrderYet:
    def test_placing_an_order_records_it_with_its_total(self) -> None:
        given().when(place).then(
            OrderPlaced(
                order_id=ORDER,
                customer_id=CUSTOMER,
                lines=LINES,
                total=eur(3499),
                shipping_address=HOME,
                payment_method_id=PAYMENT_METHOD,
                placed_at=NOW,
            )
        )

    def test_the_total_is_the_sum_of_quantity_times_unit_price(self) -> None:
        lines = (line("A", 3, 333), line("B", 10_000, 1), line("C", 1, 0))
        state = (
            given()
            .when(placing(lines))
            .then(
                OrderPlaced(
                    order_id=ORDER,
                    customer_id=CUSTOMER,
                    lines=lines,
                    total=eur(3 * 333 + 10_000),
                    shipping_address=HOME,
                    payment_method_id=PAYMENT_METHOD,
                    placed_at=NOW,
                )
            )
        )
        assert state.status == "placed"
        assert state.total == eur(10_999)

    def test_the_total_keeps_the_lines_currency(self) -> None:
        lines = (line("A", 2, 500, "USD"),)
        decided = orders.decide(placing(lines), orders.initial_state)
        assert isinstance(decided[0], OrderPlaced)
        assert decided[0].total == Money(1000, "USD")

    def test_an_order_may_have_exactly_100_lines(self) -> None:
        lines = many_lines(orders.MAX_LINES)
        given().when(placing(lines)).then(
            OrderPlaced(
                order_id=ORDER,
                customer_id=CUSTOMER,
                lines=lines,
                total=eur(100 * 100),
                shipping_address=HOME,
                payment_method_id=PAYMENT_METHOD,
                placed_at=NOW,
            )
        )

    @pytest.mark.parametrize("lines", list(INVALID_LINES.values()), ids=list(INVALID_LINES))
    def test_an_order_with_invalid_lines_is_refused(self, lines: tuple[OrderLine, ...]) -> None:
        given().when(placing(lines)).then_raises(InvalidCommand)

    @pytest.mark.parametrize(
        "address",
        [
            Address(name="", line1="x", city="y", postal_code="1", country="GB"),
            Address(name="A", line1="x", city="y", postal_code="1", country="gb"),
            Address(name="A", line1="x", city="y", postal_code="1" * 21, country="GB"),
        ],
        ids=["empty name", "lower-case country", "postal code too long"],
    )
    def test_an_order_with_an_invalid_address_is_refused(self, address: Address) -> None:
        given().when(placing(LINES, address)).then_raises(InvalidCommand)

    @pytest.mark.parametrize(
        "command",
        [
            change_lines,
            change_address,
            cancel,
            mark_stock_reserved,
            mark_payment_authorised,
            confirm,
            ship,
            reject,
        ],
        ids=ids,
    )
    def test_any_other_command_needs_an_order(self, command: OrderCommand) -> None:
        error = given().when(command).then_raises(NotFound)
        assert (error.what, error.ident) == ("order", ORDER)


# =========================================================================== placed


class TestPlaced:
    def test_placing_it_again_is_refused(self) -> None:
        given(placed).when(place).then_raises(AlreadyExists)

    def test_the_lines_can_change_and_the_total_follows(self) -> None:
        state = (
            given(placed)
            .when(change_lines)
            .then(OrderLinesChanged(order_id=ORDER, lines=NEW_LINES, total=eur(1250 + 2400), at=NOW))
        )
        assert state.lines == NEW_LINES
        assert state.total == eur(3650)

    def test_the_address_can_change(self) -> None:
        state = (
            given(placed)
            .when(change_address)
            .then(OrderShippingAddressChanged(order_id=ORDER, shipping_address=OFFICE, at=NOW))
        )
        assert state.shipping_address == OFFICE

    def test_lines_and_address_can_change_together(self) -> None:
        both = ChangeOrder(order_id=ORDER, lines=NEW_LINES, shipping_address=OFFICE, now=NOW)
        given(placed).when(both).then(
            OrderLinesChanged(order_id=ORDER, lines=NEW_LINES, total=eur(3650), at=NOW),
            OrderShippingAddressChanged(order_id=ORDER, shipping_address=OFFICE, at=NOW),
        )

    def test_a_change_to_identical_values_is_nothing(self) -> None:
        same = ChangeOrder(order_id=ORDER, lines=LINES, shipping_address=HOME, now=NOW)
        given(placed).when(same).then_nothing()

    def test_a_change_of_nothing_is_nothing(self) -> None:
        given(placed).when(ChangeOrder(order_id=ORDER, now=NOW)).then_nothing()

    def test_only_the_part_that_differs_is_recorded(self) -> None:
        half = ChangeOrder(order_id=ORDER, lines=LINES, shipping_address=OFFICE, now=NOW)
        given(placed).when(half).then(
            OrderShippingAddressChanged(order_id=ORDER, shipping_address=OFFICE, at=NOW)
        )

    def test_changing_back_to_the_latest_lines_is_nothing(self) -> None:
        changed = OrderLinesChanged(order_id=ORDER, lines=NEW_LINES, total=eur(3650), at=T1)
        given(placed, changed).when(change_lines).then_nothing()

    @pytest.mark.parametrize("lines", list(INVALID_LINES.values()), ids=list(INVALID_LINES))
    def test_invalid_new_lines_are_refused(self, lines: tuple[OrderLine, ...]) -> None:
        given(placed).when(ChangeOrder(order_id=ORDER, lines=lines, now=NOW)).then_raises(InvalidCommand)

    def test_an_invalid_new_address_is_refused(self) -> None:
        bad = Address(name="A", line1="", city="y", postal_code="1", country="GB")
        given(placed).when(ChangeOrder(order_id=ORDER, shipping_address=bad, now=NOW)).then_raises(
            InvalidCommand
        )

    def test_cancelling_records_the_status_it_left(self) -> None:
        state = given(placed).when(cancel).then(cancelled_from("placed"))
        assert state.status == "cancelled"
        assert state.cancel_reason == cancel.reason

    def test_stock_can_be_marked_reserved(self) -> None:
        given(placed).when(mark_stock_reserved).then(OrderStockReserved(order_id=ORDER, at=NOW))

    def test_stock_reserved_for_the_same_lines_in_another_order_is_fine(self) -> None:
        given(placed).when(marking(("PEN-7", 1), ("BOOK-1", 2))).then(
            OrderStockReserved(order_id=ORDER, at=NOW)
        )

    def test_stock_reserved_for_lines_the_customer_changed_is_refused(self) -> None:
        # The saga reserved the lines of OrderPlaced; the customer changed them meanwhile.
        error = given(placed, lines_changed).when(mark_stock_reserved).then_raises(LinesChanged)
        assert error.code == "lines-changed"
        assert error.reserved == orders.stock_lines(LINES)
        assert error.current == orders.stock_lines(NEW_LINES)
        assert str(error) == (
            "order ord-1: stock was reserved for 2 x BOOK-1, 1 x PEN-7, "
            "but the order's lines are now 1 x BOOK-1, 3 x MUG-3"
        )

    def test_stock_reserved_for_the_changed_lines_is_accepted(self) -> None:
        state = (
            given(placed, lines_changed)
            .when(marking(("BOOK-1", 1), ("MUG-3", 3)))
            .then(OrderStockReserved(order_id=ORDER, at=NOW))
        )
        assert (state.status, state.lines) == ("stock_reserved", NEW_LINES)

    @pytest.mark.parametrize(
        "reserved",
        [
            (("BOOK-1", 3), ("PEN-7", 1)),
            (("BOOK-1", 2),),
            (("BOOK-1", 2), ("PEN-7", 1), ("MUG-3", 1)),
            (("BOOK-1", 2), ("PEN-8", 1)),
            (),
        ],
        ids=["another quantity", "a line missing", "a line too many", "another SKU", "no lines"],
    )
    def test_stock_reserved_for_other_lines_is_refused(self, reserved: tuple[tuple[str, int], ...]) -> None:
        error = given(placed).when(marking(*reserved)).then_raises(LinesChanged)
        assert error.current == orders.stock_lines(LINES)

    def test_it_can_be_rejected(self) -> None:
        state = given(placed).when(reject).then(OrderRejected(order_id=ORDER, reason=reject.reason, at=NOW))
        assert state.status == "rejected"

    @pytest.mark.parametrize("command", [mark_payment_authorised, confirm, ship], ids=ids)
    def test_later_steps_cannot_be_skipped_to(self, command: OrderCommand) -> None:
        given(placed).when(command).then_raises(IllegalTransition)


# =================================================================== stock reserved


class TestStockReserved:
    history = (placed, stock_reserved)

    def test_marking_stock_reserved_again_is_nothing(self) -> None:
        given(*self.history).when(mark_stock_reserved).then_nothing()

    def test_marking_it_again_for_other_lines_is_refused(self) -> None:
        given(*self.history).when(marking(("BOOK-1", 1))).then_raises(LinesChanged)

    def test_payment_can_be_marked_authorised(self) -> None:
        state = (
            given(*self.history)
            .when(mark_payment_authorised)
            .then(OrderPaymentAuthorised(order_id=ORDER, payment_id=PAYMENT, at=NOW))
        )
        assert state.payment_id == PAYMENT

    def test_the_lines_can_no_longer_change(self) -> None:
        error = given(*self.history).when(change_lines).then_raises(IllegalTransition)
        assert error.status == "stock_reserved"

    def test_resending_the_current_lines_is_not_a_change(self) -> None:
        given(*self.history).when(ChangeOrder(order_id=ORDER, lines=LINES, now=NOW)).then_nothing()

    def test_the_address_can_still_change(self) -> None:
        given(*self.history).when(change_address).then(
            OrderShippingAddressChanged(order_id=ORDER, shipping_address=OFFICE, at=NOW)
        )

    def test_cancelling_records_the_status_it_left(self) -> None:
        given(*self.history).when(cancel).then(cancelled_from("stock_reserved"))

    def test_it_can_still_be_rejected(self) -> None:
        given(*self.history).when(reject).then(OrderRejected(order_id=ORDER, reason=reject.reason, at=NOW))

    def test_placing_it_again_is_refused(self) -> None:
        given(*self.history).when(place).then_raises(AlreadyExists)

    @pytest.mark.parametrize("command", [confirm, ship], ids=ids)
    def test_later_steps_cannot_be_skipped_to(self, command: OrderCommand) -> None:
        given(*self.history).when(command).then_raises(IllegalTransition)


# =============================================================== payment authorised


class TestPaymentAuthorised:
    history = (placed, stock_reserved, payment_authorised)

    def test_marking_the_same_payment_authorised_again_is_nothing(self) -> None:
        given(*self.history).when(mark_payment_authorised).then_nothing()

    def test_a_different_payment_cannot_be_marked_authorised(self) -> None:
        other = MarkPaymentAuthorised(order_id=ORDER, payment_id="pay-2", now=NOW)
        given(*self.history).when(other).then_raises(IllegalTransition)

    def test_it_can_be_confirmed(self) -> None:
        given(*self.history).when(confirm).then(OrderConfirmed(order_id=ORDER, at=NOW))

    def test_the_lines_can_no_longer_change(self) -> None:
        given(*self.history).when(change_lines).then_raises(IllegalTransition)

    def test_the_address_can_still_change(self) -> None:
        given(*self.history).when(change_address).then(
            OrderShippingAddressChanged(order_id=ORDER, shipping_address=OFFICE, at=NOW)
        )

    def test_cancelling_records_the_status_it_left(self) -> None:
        given(*self.history).when(cancel).then(cancelled_from("payment_authorised"))

    @pytest.mark.parametrize("command", [mark_stock_reserved, ship, reject], ids=ids)
    def test_illegal_transitions(self, command: OrderCommand) -> None:
        given(*self.history).when(command).then_raises(IllegalTransition)


# ======================================================================== confirmed


class TestConfirmed:
    history = (placed, stock_reserved, payment_authorised, confirmed)

    def test_confirming_again_is_nothing(self) -> None:
        given(*self.history).when(confirm).then_nothing()

    def test_it_can_be_shipped(self) -> None:
        state = (
            given(*self.history)
            .when(ship)
            .then(OrderShipped(order_id=ORDER, tracking_number="TRACK-9", at=NOW))
        )
        assert state.status == "shipped"

    def test_the_lines_can_no_longer_change(self) -> None:
        given(*self.history).when(change_lines).then_raises(IllegalTransition)

    def test_the_address_can_still_change(self) -> None:
        given(*self.history).when(change_address).then(
            OrderShippingAddressChanged(order_id=ORDER, shipping_address=OFFICE, at=NOW)
        )

    def test_cancelling_records_the_status_it_left(self) -> None:
        given(*self.history).when(cancel).then(cancelled_from("confirmed"))

    @pytest.mark.parametrize("command", [mark_stock_reserved, mark_payment_authorised, reject], ids=ids)
    def test_illegal_transitions(self, command: OrderCommand) -> None:
        given(*self.history).when(command).then_raises(IllegalTransition)


# ============================================================ final: shipped, rejected, cancelled

ALL_BUT_PLACE: list[OrderCommand] = [
    change_lines,
    change_address,
    cancel,
    mark_stock_reserved,
    mark_payment_authorised,
    confirm,
    ship,
    reject,
]


class TestShipped:
    history = (placed, stock_reserved, payment_authorised, confirmed, shipped)

    def test_shipping_again_is_nothing(self) -> None:
        given(*self.history).when(ship).then_nothing()

    def test_a_change_to_identical_values_is_still_refused(self) -> None:
        same = ChangeOrder(order_id=ORDER, shipping_address=HOME, now=NOW)
        given(*self.history).when(same).then_raises(IllegalTransition)

    def test_placing_it_again_is_refused(self) -> None:
        given(*self.history).when(place).then_raises(AlreadyExists)

    @pytest.mark.parametrize("command", [c for c in ALL_BUT_PLACE if c is not ship], ids=ids)
    def test_nothing_else_is_allowed(self, command: OrderCommand) -> None:
        error = given(*self.history).when(command).then_raises(IllegalTransition)
        assert error.status == "shipped"


class TestRejected:
    history = (placed, rejected)

    def test_rejecting_again_is_nothing(self) -> None:
        given(*self.history).when(reject).then_nothing()

    def test_the_state_keeps_the_reason(self) -> None:
        state = given(*self.history).state
        assert (state.status, state.cancel_reason) == ("rejected", rejected.reason)

    def test_placing_it_again_is_refused(self) -> None:
        given(*self.history).when(place).then_raises(AlreadyExists)

    @pytest.mark.parametrize("command", [c for c in ALL_BUT_PLACE if c is not reject], ids=ids)
    def test_nothing_else_is_allowed(self, command: OrderCommand) -> None:
        error = given(*self.history).when(command).then_raises(IllegalTransition)
        assert error.status == "rejected"


class TestCancelled:
    history = (placed, cancelled)

    def test_cancelling_twice_is_refused(self) -> None:
        given(*self.history).when(cancel).then_raises(IllegalTransition)

    def test_placing_it_again_is_refused(self) -> None:
        given(*self.history).when(place).then_raises(AlreadyExists)

    @pytest.mark.parametrize("command", ALL_BUT_PLACE, ids=ids)
    def test_nothing_is_allowed(self, command: OrderCommand) -> None:
        error = given(*self.history).when(command).then_raises(IllegalTransition)
        assert error.status == "cancelled"


def test_the_stream_of_an_order() -> None:
    assert orders.decider.category == "order"
    assert orders.stream_name(ORDER) == "order-ord-1"
