"""Properties of the stock decider over random command sequences (hypothesis).

Whatever commands arrive, in whatever order, at whatever (skewed) times, and
whichever of them the domain refuses:

- ``available`` never goes negative, ``reserved`` is the sum of the
  reservations the events hold, ``on_hand`` is what was added minus what was
  committed, and a release or commit moves exactly the quantity that was held;
- the state names no order but those in flight and those released within the
  guard window: its size never depends on how many orders have finished;
- a late reservation (built before its order was released, landing after) never
  holds stock: no leak.

Time: ``clock`` is the real time, advancing; each command carries its writer's
clock, off by at most ``CLOCK_SKEW`` from the others; a late reservation was
built some time before the moment it is decided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orderstream.domain import inventory
from orderstream.domain.common import DomainError, Money
from orderstream.domain.inventory import (
    CLOCK_SKEW,
    RELEASE_GUARD,
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
START = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
FEW_ORDERS = st.sampled_from(["ord-1", "ord-2", "ord-3", "ord-4"])
MANY_ORDERS = st.integers(0, 100).map(lambda n: f"ord-{n}")
SECONDS = st.integers(0, 200).map(lambda s: timedelta(seconds=s))
SKEW = st.integers(-CLOCK_SKEW.seconds // 2, CLOCK_SKEW.seconds // 2).map(lambda s: timedelta(seconds=s))


@dataclass(frozen=True)
class Step:
    """One command, ``wait`` after the previous one; ``late``: a reservation built
    that long before it is decided; ``skew``: its writer's clock error."""

    kind: str
    order_id: str
    quantity: int
    wait: timedelta
    late: timedelta
    skew: timedelta


def steps(orders: st.SearchStrategy[str]) -> st.SearchStrategy[Step]:
    return st.builds(
        Step,
        kind=st.sampled_from(["add", "reserve", "reserve", "release", "commit"]),
        order_id=orders,
        quantity=st.integers(-2, 30),
        wait=SECONDS,
        late=st.one_of(st.just(timedelta(0)), SECONDS),
        skew=SKEW,
    )


def command_of(step: Step, built: datetime) -> InventoryCommand:
    match step.kind:
        case "add":
            return AddStock(sku=SKU, quantity=step.quantity, now=built)
        case "reserve":
            return ReserveStock(sku=SKU, order_id=step.order_id, quantity=step.quantity, now=built)
        case "release":
            return ReleaseStock(sku=SKU, order_id=step.order_id, reason="compensation", now=built)
        case _:
            return CommitStock(sku=SKU, order_id=step.order_id, now=built)


def attempt(command: InventoryCommand, state: Product) -> Sequence[InventoryEvent] | DomainError:
    """The events decided, or the domain error that refused the command."""
    try:
        return inventory.decide(command, state)
    except DomainError as error:
        return error


def registered_product() -> Product:
    return inventory.evolve(
        inventory.initial_state, ProductRegistered(sku=SKU, name="x", price=Money(100, "EUR"), at=START)
    )


@dataclass
class Model:
    """What the events alone say, kept beside the state."""

    held: dict[str, int] = field(default_factory=dict)
    added: int = 0
    taken: int = 0
    finished: set[str] = field(default_factory=set)
    released_real: dict[str, datetime] = field(default_factory=dict)
    """order id -> real time of its latest release."""
    release_stamps: list[tuple[str, datetime]] = field(default_factory=list)
    """(order id, ``at``) of every release, in append order."""

    def fold(self, event: InventoryEvent, real: datetime) -> None:
        match event:
            case StockAdded():
                self.added += event.quantity
            case StockReserved():
                self.held[event.order_id] = event.quantity
            case StockReleased():
                assert event.quantity == self.held.pop(event.order_id, 0)
                self.released_real[event.order_id] = real
                self.release_stamps.append((event.order_id, event.at))
                self.finished.add(event.order_id)
            case StockCommitted():
                assert event.quantity == self.held.pop(event.order_id)
                self.taken += event.quantity
                self.finished.add(event.order_id)
            case _:
                pytest.fail(f"unexpected {event!r}")


def run(sequence: list[Step]) -> None:
    state = registered_product()
    model = Model()
    clock = START
    for step in sequence:
        clock += step.wait
        built_real = clock - step.late if step.kind == "reserve" else clock
        command = command_of(step, built_real + step.skew)
        events = attempt(command, state)
        if isinstance(events, InsufficientStock):  # all or nothing, and it says why
            assert isinstance(command, ReserveStock)
            assert events.requested == command.quantity
            assert (
                events.available == state.available + model.held.get(command.order_id, 0) < command.quantity
            )
            continue
        if isinstance(events, DomainError):
            continue
        for event in events:
            if isinstance(event, StockReserved):
                released = model.released_real.get(event.order_id)
                assert released is None or built_real > released, "a late reservation held stock again"
            model.fold(event, clock)
            state = inventory.evolve(state, event)
        check(state, model)


def check(state: Product, model: Model) -> None:
    assert state.available >= 0
    assert dict(state.reservations) == model.held
    assert state.reserved == sum(model.held.values())
    assert all(quantity >= 1 for quantity in model.held.values())
    assert state.on_hand == model.added - model.taken
    # Bounded: only orders in flight, and releases within the guard window (plus
    # the clock skew that may keep one a little behind a younger one).
    assert state.latest_at is not None
    horizon = state.latest_at - RELEASE_GUARD - CLOCK_SKEW
    recent = {order for order, stamp in model.release_stamps if stamp >= horizon}
    assert set(state.released_at) <= recent
    assert set(state.reservations) | set(state.released_at) <= set(model.held) | recent


@settings(max_examples=500, derandomize=True, database=None, deadline=None)
@given(st.lists(steps(FEW_ORDERS), max_size=40))
def test_stock_invariants_hold_for_any_command_sequence(sequence: list[Step]) -> None:
    run(sequence)


@settings(
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],  # long sequences, on a shared machine
)
@given(st.lists(steps(MANY_ORDERS), min_size=50, max_size=300))
def test_the_state_never_grows_with_finished_orders(sequence: list[Step]) -> None:
    run(sequence)


@settings(max_examples=50, derandomize=True, database=None, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3), st.booleans(), SECONDS), min_size=1, max_size=50),
    st.integers(1, 20),
)
def test_a_product_with_many_finished_orders_keeps_only_the_recent_releases(
    orders: list[tuple[int, bool, timedelta]], rounds: int
) -> None:
    """Orders one after another, each reserved then committed or released: after
    any number of them the state holds at most the releases of the last window."""
    state = registered_product()
    clock = START
    releases: list[datetime] = []
    for n, (quantity, ships, wait) in enumerate(orders * rounds):
        clock += wait + timedelta(seconds=1)
        order_id = f"ord-{n}"
        for command in (
            AddStock(sku=SKU, quantity=quantity, now=clock),
            ReserveStock(sku=SKU, order_id=order_id, quantity=quantity, now=clock),
            CommitStock(sku=SKU, order_id=order_id, now=clock)
            if ships
            else ReleaseStock(sku=SKU, order_id=order_id, reason="declined", now=clock),
        ):
            for event in inventory.decide(command, state):
                state = inventory.evolve(state, event)
        if not ships:
            releases.append(clock)
    assert (state.reserved, dict(state.reservations)) == (0, {})
    assert state.orders_committed + state.orders_released == len(orders) * rounds
    assert len(state.released_at) == sum(1 for at in releases if at >= clock - RELEASE_GUARD)


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(st.lists(steps(FEW_ORDERS), max_size=40))
def test_a_repeated_reserve_or_release_decides_nothing(sequence: list[Step]) -> None:
    """A reserve or release sent again right after it succeeded decides nothing,
    even without its idempotency key (a retried commit relies on the key: the
    handler answers it before the decider runs; see test_inventory.py)."""
    state = registered_product()
    clock = START
    for step in sequence:
        clock += step.wait
        command = command_of(step, clock)
        events = attempt(command, state)
        if isinstance(events, DomainError):
            continue
        for event in events:
            state = inventory.evolve(state, event)
        if isinstance(command, ReserveStock | ReleaseStock):
            assert list(inventory.decide(command, state)) == []


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    held=st.integers(0, 5),
    later=st.lists(st.tuples(SECONDS, SKEW), max_size=6),
    built_before=SECONDS,
    skews=st.tuples(SKEW, SKEW),
)
def test_a_late_reservation_never_holds_stock_for_a_released_order(
    held: int,
    later: list[tuple[timedelta, timedelta]],
    built_before: timedelta,
    skews: tuple[timedelta, timedelta],
) -> None:
    """The attempt was built before the release (``built_before``) and is decided
    after any number of later events: it is refused, whether the release is
    still remembered or already forgotten."""
    release_skew, reserve_skew = skews
    state = registered_product()
    history: list[InventoryEvent] = [StockAdded(sku=SKU, quantity=100, at=START)]
    if held:
        history.append(StockReserved(sku=SKU, order_id="ord-1", quantity=held, at=START))
    released = START + timedelta(seconds=1)
    history += inventory.decide(
        ReleaseStock(sku=SKU, order_id="ord-1", reason="gave up", now=released + release_skew), state
    )
    clock = released
    for wait, skew in later:
        clock += wait
        history.append(StockAdded(sku=SKU, quantity=1, at=clock + skew))
    for event in history:
        state = inventory.evolve(state, event)
    late = ReserveStock(
        sku=SKU, order_id="ord-1", quantity=held + 1, now=released - built_before + reserve_skew
    )
    with pytest.raises(DomainError):
        inventory.decide(late, state)
