"""The hot-product path: a batch of commands decided together and appended once, and
the per-stream single writer that makes those batches out of concurrent callers.

Real ``SqliteEventStore`` in ``tmp_path``. The one wrapper, :class:`ReadsCounted`,
forwards every call to the real store and counts which streams were read.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from orderstream.application.commands import (
    CommandContext,
    CommandHandler,
    CommandResult,
    IdempotencyKeyReused,
    Request,
    derived_event_id,
    request_digest,
)
from orderstream.application.snapshots import SnapshotStore
from orderstream.application.use_cases import LineRequest, UnknownProduct, UseCases
from orderstream.domain import inventory, orders
from orderstream.domain.common import DomainError, Money
from orderstream.events import registry
from orderstream.eventstore.sqlite import EventStoreClosed, SqliteEventStore
from orderstream.metrics import MeteredCommandHandler, Metrics
from orderstream.sagas.fulfilment.payment_gateway import SandboxPaymentGateway

SKU = "HOT-1"
STREAM = inventory.stream_name(SKU)
EUR = Money(1999, "EUR")
NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
ADDRESS = orders.Address(name="Ada", line1="1 Loop St", city="Lyon", postal_code="69001", country="FR")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteEventStore]:
    store = await SqliteEventStore.open(tmp_path / "events.db")
    try:
        yield store
    finally:
        await store.close()


async def product_with_stock(use_cases: UseCases, quantity: int) -> None:
    await use_cases.register_product(SKU, "Hot item", EUR, CommandContext(actor="admin"))
    await use_cases.add_stock(SKU, quantity, CommandContext(actor="admin"))


def reserve(order_id: str, quantity: int = 1) -> inventory.ReserveStock:
    # The real clock, as the products are written with it: a reservation built long
    # before the product's newest event is refused as stale (domain/inventory.py).
    return inventory.ReserveStock(sku=SKU, order_id=order_id, quantity=quantity, now=datetime.now(UTC))


async def test_500_concurrent_reservations_of_one_sku_never_oversell_and_share_appends(
    store: SqliteEventStore,
) -> None:
    conflicts: list[str] = []
    use_cases = UseCases(
        CommandHandler(store, registry, on_conflict=conflicts.append), vault=SandboxPaymentGateway()
    )
    await product_with_stock(use_cases, 250)
    appends_before = store.stats.appends

    outcomes = await asyncio.gather(
        *(
            use_cases.reserve_stock(
                SKU, f"order-{n}", 1, CommandContext(actor="saga", idempotency_key=f"r-{n}")
            )
            for n in range(500)
        ),
        return_exceptions=True,
    )

    won = [o for o in outcomes if isinstance(o, CommandResult)]
    refused = [o for o in outcomes if isinstance(o, inventory.InsufficientStock)]
    assert (len(won), len(refused)) == (250, 250)
    product = (await use_cases.handler.load(inventory.decider, STREAM)).state
    assert (product.on_hand, product.reserved, product.available) == (250, 250, 0)
    assert sorted(r.revision for r in won) == list(range(2, 252))  # each its own revision
    assert conflicts == []  # one writer per stream: no race to lose
    assert store.stats.appends - appends_before < 50  # batched, not one append per reservation
    # Every reservation keeps its own metadata, derived id and idempotency record.
    events = await store.read_stream(STREAM, from_revision=2)
    for recorded in events:
        order_id = registry.decode(recorded).order_id
        key = f"r-{order_id.removeprefix('order-')}"
        assert recorded.metadata.idempotency_key == key
        assert recorded.id == derived_event_id(CommandContext(actor="saga", idempotency_key=key), STREAM, 0)
        record = await store.find_idempotency("saga", key, STREAM)
        assert record is not None
        assert (record.revision, record.position) == (recorded.revision, recorded.position)


async def test_two_writers_on_one_stream_race_between_batches_and_still_never_oversell(
    store: SqliteEventStore,
) -> None:
    """Two processes' batchers (here two handlers on one store) retry their lost races."""
    first, second = (
        UseCases(CommandHandler(store, registry), vault=SandboxPaymentGateway()),
        UseCases(CommandHandler(store, registry), vault=SandboxPaymentGateway()),
    )
    await product_with_stock(first, 100)
    outcomes = await asyncio.gather(
        *(
            (first if n % 2 else second).reserve_stock(SKU, f"order-{n}", 1, CommandContext())
            for n in range(160)
        ),
        return_exceptions=True,
    )
    assert sum(isinstance(o, CommandResult) for o in outcomes) == 100
    assert sum(isinstance(o, inventory.InsufficientStock) for o in outcomes) == 60
    product = (await first.handler.load(inventory.decider, STREAM)).state
    assert (product.on_hand, product.reserved, product.available) == (100, 100, 0)


async def test_a_broken_rule_fails_only_its_own_command_of_the_batch(store: SqliteEventStore) -> None:
    handler = CommandHandler(store, registry)
    await product_with_stock(UseCases(handler, vault=SandboxPaymentGateway()), 3)
    keyed = CommandContext(actor="saga", idempotency_key="k-b", correlation_id="c-b")
    outcomes = await handler.handle_batch(
        inventory.decider,
        STREAM,
        [
            Request(reserve("a", 2), CommandContext(correlation_id="c-a")),
            Request(reserve("too-many", 2)),  # 1 left after "a"
            Request(reserve("b", 1), keyed),
            # Nothing held: a zero-quantity release, the guard against a late reservation.
            Request(inventory.ReleaseStock(sku=SKU, order_id="nobody", reason="x", now=datetime.now(UTC))),
        ],
    )
    a, too_many, b, guard = outcomes
    assert isinstance(too_many, inventory.InsufficientStock)
    assert isinstance(a, CommandResult)
    assert isinstance(b, CommandResult)
    assert isinstance(guard, CommandResult)
    assert (a.revision, b.revision, guard.revision) == (2, 3, 4)
    assert [(type(e), e.quantity) for e in guard.appended] == [(inventory.StockReleased, 0)]
    assert a.position == b.position == guard.position  # one append
    stored = await store.read_stream(STREAM, from_revision=2)
    assert [e.metadata.correlation_id for e in stored[:2]] == ["c-a", "c-b"]
    assert len(stored) == 3
    assert stored[1].id == derived_event_id(keyed, STREAM, 0)
    record = await store.find_idempotency("saga", "k-b", STREAM)
    assert record is not None
    assert record.revision == 3
    # The keyed command replays from its record in any later batch.
    (again,) = await handler.handle_batch(inventory.decider, STREAM, [Request(reserve("b", 1), keyed)])
    assert isinstance(again, CommandResult)
    assert again.replayed
    assert again.revision == 3


async def test_one_key_twice_in_a_batch_writes_once_and_another_body_is_refused(
    store: SqliteEventStore,
) -> None:
    handler = CommandHandler(store, registry)
    await product_with_stock(UseCases(handler, vault=SandboxPaymentGateway()), 10)

    def context(quantity: int) -> CommandContext:
        return CommandContext(actor="alice", idempotency_key="dup", request_hash=request_digest(quantity))

    first, repeat, other = await handler.handle_batch(
        inventory.decider,
        STREAM,
        [
            Request(reserve("o", 2), context(2)),
            Request(reserve("o", 2), context(2)),
            Request(reserve("o", 3), context(3)),
        ],
    )
    assert isinstance(first, CommandResult)
    assert isinstance(repeat, CommandResult)
    assert repeat.replayed
    assert (repeat.revision, repeat.position) == (first.revision, first.position)
    assert isinstance(other, IdempotencyKeyReused)
    assert await store.stream_revision(STREAM) == 2


class ReadsCounted:
    """The real store; counts the streams read."""

    def __init__(self, inner: SqliteEventStore) -> None:
        self.inner = inner
        self.reads: Counter[str] = Counter()

    async def read_stream(self, stream: str, **kwargs: Any) -> Any:
        self.reads[stream] += 1
        return await self.inner.read_stream(stream, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def place(use_cases: UseCases, context: CommandContext, sku: str = SKU) -> CommandResult[orders.Order]:
    return await use_cases.place_order(
        customer_id="c-1",
        lines=[LineRequest(sku, 2)],
        shipping_address=ADDRESS,
        payment_token="tok_approve",
        context=context,
    )


async def test_placing_an_order_reads_neither_its_new_stream_nor_a_known_products(
    store: SqliteEventStore,
) -> None:
    counted: Any = ReadsCounted(store)
    use_cases = UseCases(CommandHandler(counted, registry), vault=SandboxPaymentGateway())
    await product_with_stock(use_cases, 10)
    first = await place(use_cases, CommandContext())  # learns the price
    counted.reads.clear()

    plain = await place(use_cases, CommandContext())
    keyed = await place(use_cases, CommandContext(actor="alice", idempotency_key="p-1", request_hash="h"))
    assert counted.reads == Counter()
    assert plain.state.lines[0].unit_price == first.state.lines[0].unit_price == EUR
    assert plain.state.status == keyed.state.status == "placed"
    # The key's replay finds its record; another body is refused, nothing written.
    again = await place(use_cases, CommandContext(actor="alice", idempotency_key="p-1", request_hash="h"))
    assert again.replayed
    assert (again.stream, again.revision, again.position) == (keyed.stream, keyed.revision, keyed.position)
    with pytest.raises(IdempotencyKeyReused):
        await place(use_cases, CommandContext(actor="alice", idempotency_key="p-1", request_hash="other"))
    assert await store.stream_revision(keyed.stream) == 0


async def test_an_unknown_sku_is_refused_every_time_until_it_is_registered(store: SqliteEventStore) -> None:
    use_cases = UseCases(CommandHandler(store, registry), vault=SandboxPaymentGateway())
    head = await store.head_position()
    for _ in range(2):
        with pytest.raises(UnknownProduct):
            await place(use_cases, CommandContext(), sku="LATER")
    assert await store.head_position() == head
    await use_cases.register_product("LATER", "Later", EUR, CommandContext(actor="admin"))
    placed = await place(use_cases, CommandContext(), sku="LATER")
    assert placed.state.lines[0].unit_price == EUR


async def test_an_order_id_that_exists_falls_back_to_the_ordinary_path(store: SqliteEventStore) -> None:
    """``create`` assumes a new stream; if it exists after all, the decider answers."""
    handler = CommandHandler(store, registry)
    order_id = str(uuid.uuid4())
    command = orders.PlaceOrder(
        order_id=order_id,
        customer_id="c-1",
        lines=(orders.OrderLine(sku=SKU, quantity=1, unit_price=EUR),),
        shipping_address=ADDRESS,
        payment_method_id="pm_test",
        now=NOW,
    )
    await handler.create(orders.decider, orders.stream_name(order_id), command)
    with pytest.raises(DomainError):
        await handler.create(orders.decider, orders.stream_name(order_id), command)
    assert await store.stream_revision(orders.stream_name(order_id)) == 0


async def test_batched_commands_are_counted_one_by_one_by_the_metrics_wrapper(
    store: SqliteEventStore,
) -> None:
    metrics = Metrics()
    handler = MeteredCommandHandler(
        CommandHandler(store, registry, on_conflict=metrics.conflict_retried), metrics
    )
    use_cases = UseCases(handler, vault=SandboxPaymentGateway())
    await product_with_stock(use_cases, 2)
    outcomes = await asyncio.gather(
        *(use_cases.reserve_stock(SKU, f"o-{n}", 1, CommandContext()) for n in range(3)),
        return_exceptions=True,
    )
    assert sum(isinstance(o, CommandResult) for o in outcomes) == 2

    def observed(outcome: str) -> float:
        value = metrics.registry.get_sample_value(
            "orderstream_command_duration_seconds_count", {"command": "ReserveStock", "outcome": outcome}
        )
        return value or 0.0

    assert (observed("ok"), observed("insufficient-stock")) == (2.0, 1.0)
    appended = metrics.registry.get_sample_value("orderstream_events_appended_total", {"category": "product"})
    assert appended == 4.0  # registered, stocked, two reservations


async def test_batches_leave_snapshots_that_load_as_the_full_fold(store: SqliteEventStore) -> None:
    snapshots = SnapshotStore(store, every=10)
    handler = CommandHandler(store, registry, snapshots=snapshots)
    use_cases = UseCases(handler, vault=SandboxPaymentGateway())
    await product_with_stock(use_cases, 60)
    for wave in range(4):  # several batches, each past a snapshot boundary
        await asyncio.gather(
            *(use_cases.reserve_stock(SKU, f"o-{wave}-{n}", 1, CommandContext()) for n in range(25)),
            return_exceptions=True,
        )
        await snapshots.drain()
    loaded = await handler.load(inventory.decider, STREAM)
    full = await CommandHandler(store, registry).load(inventory.decider, STREAM)
    assert loaded.snapshot is not None
    assert snapshots.stats.written >= 3
    assert loaded.state == full.state
    assert (loaded.state.on_hand, loaded.state.reserved, loaded.state.available) == (60, 60, 0)
    await handler.close()


async def test_a_failed_batch_fails_each_caller_and_the_next_batch_starts_afresh(tmp_path: Path) -> None:
    store = await SqliteEventStore.open(tmp_path / "closing.db")
    use_cases = UseCases(CommandHandler(store, registry), vault=SandboxPaymentGateway())
    await product_with_stock(use_cases, 5)
    await store.close()
    outcomes = await asyncio.gather(
        *(use_cases.reserve_stock(SKU, f"o-{n}", 1, CommandContext()) for n in range(3)),
        return_exceptions=True,
    )
    assert all(isinstance(o, EventStoreClosed) for o in outcomes), outcomes
    with pytest.raises(EventStoreClosed):  # no lane left behind waiting for a dead task
        await asyncio.wait_for(use_cases.reserve_stock(SKU, "o-late", 1, CommandContext()), 5)
