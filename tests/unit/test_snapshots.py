"""Snapshots: a load from a snapshot gives exactly the state of a full fold.

Real ``SqliteEventStore`` in ``tmp_path``. Histories are appended directly (fast)
or through the command handler; each stream is then loaded by a handler without
snapshots (the full fold, the reference) and by one with them.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest

from orderstream.application.commands import CommandContext, CommandHandler, Loaded
from orderstream.application.snapshots import (
    PendingSnapshot,
    SnapshotStore,
    snapshot_stream,
    state_schema_id,
)
from orderstream.domain import inventory, orders, payments
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.base import ANY, EventMetadata
from orderstream.eventstore.sqlite import SqliteEventStore

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
EUR = Money(1999, "EUR")
ADDRESS = orders.Address(name="Ada", line1="1 Loop St", city="Lyon", postal_code="69001", country="FR")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    store = await SqliteEventStore.open(tmp_path / "events.db")
    try:
        yield store
    finally:
        await store.close()


def product_history(sku: str, length: int, seed: int = 7) -> list[tuple[Any, dict[str, Any]]]:
    """``length`` inventory events that the decider could have produced: stock added,
    reserved, then released or committed, about a third of them keyed."""
    rng = random.Random(seed)
    out: list[tuple[Any, dict[str, Any]]] = [
        (inventory.ProductRegistered(sku=sku, name="Widget", price=EUR, at=NOW), {"actor": "admin"})
    ]
    held: dict[str, int] = {}
    on_hand = 0
    while len(out) < length:
        meta: dict[str, Any] = {"actor": rng.choice(["saga", "alice"])}
        if rng.random() < 0.35:
            meta |= {"idempotency_key": f"k-{len(out)}", "request_hash": f"{rng.getrandbits(64):016x}"}
        roll = rng.random()
        if roll < 0.15 or on_hand - sum(held.values()) < 5:
            quantity = rng.randint(5, 50)
            on_hand += quantity
            out.append((inventory.StockAdded(sku=sku, quantity=quantity, at=NOW), meta))
        elif roll < 0.6 or not held:
            order_id = str(uuid.UUID(int=rng.getrandbits(128)))
            quantity = rng.randint(1, min(5, on_hand - sum(held.values())))
            held[order_id] = quantity
            out.append((inventory.StockReserved(sku=sku, order_id=order_id, quantity=quantity, at=NOW), meta))
        else:
            order_id = rng.choice(sorted(held))
            quantity = held.pop(order_id)
            if rng.random() < 0.5:
                out.append(
                    (
                        inventory.StockReleased(
                            sku=sku, order_id=order_id, quantity=quantity, reason="timeout", at=NOW
                        ),
                        meta,
                    )
                )
            else:
                on_hand -= quantity
                out.append(
                    (inventory.StockCommitted(sku=sku, order_id=order_id, quantity=quantity, at=NOW), meta)
                )
    return out


async def append_history(
    store: SqliteEventStore, stream: str, history: list[tuple[Any, dict[str, Any]]]
) -> None:
    for start in range(0, len(history), 250):
        batch = [
            registry.to_new_event(event, event_id=uuid.uuid4(), metadata=EventMetadata(**meta))
            for event, meta in history[start : start + 250]
        ]
        await store.append(stream, batch, ANY)


async def snapshot_at(store: SqliteEventStore, handler: CommandHandler, decider: Any, stream: str) -> None:
    """Write a snapshot of ``stream`` as it is now (what the background task does)."""
    loaded = await handler.load(decider, stream)
    assert loaded.revision is not None
    assert loaded.position is not None
    snapshots = SnapshotStore(store, every=1)
    await snapshots.write(
        PendingSnapshot(
            stream=stream,
            state=loaded.state,
            schema=state_schema_id(type(decider.initial_state())),
            revision=loaded.revision,
            position=loaded.position,
            base=loaded.snapshot,
        )
    )


# ----------------------------------------------------------------------- equivalence


async def test_a_long_product_history_loads_from_snapshots_exactly_as_a_full_fold(
    store: SqliteEventStore,
) -> None:
    stream = inventory.stream_name("SKU-LONG")
    history = product_history("SKU-LONG", 1_000)
    full = CommandHandler(store, registry)
    snapped = CommandHandler(store, registry, snapshots=SnapshotStore(store, every=100))
    # Snapshots at several points of the history; after each, every later prefix
    # must load to the full fold's state.
    appended = 0
    for cut in (130, 400, 777, 1_000):
        await append_history(store, stream, history[appended:cut])
        appended = cut
        await snapshot_at(store, full, inventory.decider, stream)
        reference = await full.load(inventory.decider, stream)
        loaded = await snapped.load(inventory.decider, stream)
        assert loaded.snapshot is not None
        assert loaded.snapshot.revision == cut - 1
        assert loaded.state == reference.state
        assert (loaded.revision, loaded.position) == (reference.revision, reference.position)
        assert loaded.events == []
    # And with a tail after the last snapshot, at every revision of it.
    tail = product_history("SKU-LONG", 1_150, seed=7)[1_000:]
    await append_history(store, stream, tail)
    for up_to in (999, 1_000, 1_075, 1_149):
        reference = await full.load(inventory.decider, stream, up_to=up_to)
        loaded = await snapped.load(inventory.decider, stream, up_to=up_to)
        assert loaded.snapshot is not None
        assert loaded.snapshot.revision == 999
        assert loaded.state == reference.state
        assert loaded.revision == reference.revision == up_to
        assert [e.revision for e in loaded.events] == list(range(1_000, up_to + 1))
    state = (await snapped.load(inventory.decider, stream)).state
    assert state.reservations
    assert state.orders_committed
    assert state.orders_released


async def test_orders_and_payments_written_by_commands_load_alike_with_snapshots(
    store: SqliteEventStore,
) -> None:
    snapshots = SnapshotStore(store, every=2)
    handler = CommandHandler(store, registry, snapshots=snapshots)
    full = CommandHandler(store, registry)
    line = orders.OrderLine(sku="SKU-1", quantity=2, unit_price=EUR)
    other = orders.OrderLine(sku="SKU-2", quantity=1, unit_price=EUR)
    for n in range(6):
        order_id, payment_id = f"o{n}", f"p{n}"
        order = orders.stream_name(order_id)
        steps: list[orders.OrderCommand] = [
            orders.PlaceOrder(
                order_id=order_id,
                customer_id="c1",
                lines=(line,),
                shipping_address=ADDRESS,
                payment_method_id="pm_sbx_approve_1",
                now=NOW,
            ),
            orders.ChangeOrder(order_id=order_id, lines=(line, other), now=NOW),
            orders.MarkStockReserved(order_id=order_id, lines=orders.stock_lines((line, other)), now=NOW),
        ]
        if n % 3 == 0:
            steps.append(orders.CancelOrder(order_id=order_id, reason="changed my mind", now=NOW))
        else:
            steps += [
                orders.MarkPaymentAuthorised(order_id=order_id, payment_id=payment_id, now=NOW),
                orders.ConfirmOrder(order_id=order_id, now=NOW),
                orders.ShipOrder(order_id=order_id, tracking_number="TRK", now=NOW),
            ]
        for step in steps:
            await handler.handle(orders.decider, order, step, context=CommandContext(actor="saga"))
            await snapshots.drain()
        payment = payments.stream_name(payment_id)
        for pay in (
            payments.RequestPayment(
                payment_id=payment_id,
                order_id=order_id,
                amount=EUR.times(3),
                payment_method_id="pm_sbx_approve_1",
                now=NOW,
            ),
            payments.AuthorisePayment(payment_id=payment_id, authorisation_code="A1", now=NOW),
            payments.CapturePayment(payment_id=payment_id, now=NOW),
        ):
            await handler.handle(payments.decider, payment, pay)
            await snapshots.drain()
        pairs: list[tuple[Loaded[Any], Loaded[Any]]] = [
            (await handler.load(orders.decider, order), await full.load(orders.decider, order)),
            (await handler.load(payments.decider, payment), await full.load(payments.decider, payment)),
        ]
        for loaded, reference in pairs:
            assert loaded.snapshot is not None
            assert loaded.state == reference.state
            assert (loaded.revision, loaded.position) == (reference.revision, reference.position)
    assert snapshots.stats.written >= 18
    assert snapshots.stats.failed == 0


# ----------------------------------------------------------------------- schema ids


def test_each_state_type_has_its_own_stable_schema_id() -> None:
    ids = {state_schema_id(t) for t in (inventory.Product, orders.Order, payments.Payment)}
    assert len(ids) == 3
    assert state_schema_id(inventory.Product) == state_schema_id(inventory.Product)

    class Product(msgspec.Struct, frozen=True, kw_only=True):  # same name, one more field
        registered: bool = False
        sku: str = ""
        colour: str = ""

    assert state_schema_id(Product) != state_schema_id(inventory.Product)


def _state(version: int | None, doc: str) -> type[msgspec.Struct]:
    namespace: dict[str, Any] = {"__doc__": doc, "__annotations__": {"on_hand": int}, "on_hand": 0}
    if version is not None:
        namespace["__annotations__"]["SNAPSHOT_VERSION"] = ClassVar[int]
        namespace["SNAPSHOT_VERSION"] = version
    return type("Stock", (msgspec.Struct,), namespace)


def test_the_schema_id_is_the_explicit_version_and_the_structure_not_the_prose() -> None:
    plain = _state(None, "Stock on hand.")
    reworded = _state(None, "How many units are on the shelf (reworded).")
    assert state_schema_id(plain) == state_schema_id(reworded)  # a docstring edit keeps snapshots
    assert state_schema_id(plain).startswith("v1:")  # no declared version: 1
    assert state_schema_id(_state(1, "Stock on hand.")) == state_schema_id(plain)
    bumped = _state(2, "Stock on hand.")
    assert state_schema_id(bumped).startswith("v2:")
    assert state_schema_id(bumped) != state_schema_id(plain)  # same shape, new meaning: invalidated


async def test_a_snapshot_of_an_older_version_is_ignored(store: SqliteEventStore) -> None:
    stream = inventory.stream_name("SKU-V")
    await append_history(store, stream, product_history("SKU-V", 30))
    await snapshot_at(store, CommandHandler(store, registry), inventory.decider, stream)
    snapshots = SnapshotStore(store, every=10)
    assert await snapshots.read(inventory.Product, stream) is not None

    class Product(inventory.Product, frozen=True, kw_only=True):  # the same shape, a bumped version
        SNAPSHOT_VERSION: ClassVar[int] = 99

    assert await snapshots.read(Product, stream) is None
    assert snapshots.stats.ignored == 1


async def test_a_snapshot_is_readable_json_in_its_own_stream(store: SqliteEventStore) -> None:
    stream = inventory.stream_name("SKU-J")
    await append_history(store, stream, product_history("SKU-J", 40))
    await snapshot_at(store, CommandHandler(store, registry), inventory.decider, stream)
    [event] = await store.read_stream(snapshot_stream(stream))
    assert event.stream == "snapshot-product-SKU-J"
    assert event.category == "snapshot"
    assert event.type == "Snapshot"
    data = msgspec.json.decode(event.data)
    assert set(data) == {"revision", "position", "schema", "state"}  # no idempotency records
    assert data["revision"] == 39
    assert data["schema"] == state_schema_id(inventory.Product)
    assert data["state"]["sku"] == "SKU-J"


def test_snapshots_are_not_domain_events() -> None:
    # Nothing that decodes domain events by type can mistake one for an event of
    # its aggregate.
    assert "Snapshot" not in registry
