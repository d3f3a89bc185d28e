"""The pure projection planner: a batch + the stored documents -> writes, held and failed events."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec

from orderstream.application import projection_plan
from orderstream.application.projection_plan import Gap
from orderstream.domain import inventory
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.base import RecordedEvent
from orderstream.readstore.base import Stored, Upsert
from projections import product_stock

NOW = datetime(2024, 5, 1, tzinfo=UTC)
PROJECTION = product_stock.projection


def recorded(
    sku: str, revision: int, event: msgspec.Struct | None = None, *, position: int = 0
) -> RecordedEvent:
    """``event`` at ``revision`` of ``product-{sku}``; ``None``: a StockAdded without quantity
    (the projection cannot fold it)."""
    data = (
        registry.to_new_event(event, event_id=uuid.uuid4()).data
        if event is not None
        else msgspec.json.encode({"sku": sku, "at": "2024-05-01T00:00:00Z"})
    )
    return RecordedEvent(
        id=uuid.uuid4(),
        stream=f"product-{sku}",
        revision=revision,
        position=1000 + revision,
        type="ProductRegistered" if isinstance(event, inventory.ProductRegistered) else "StockAdded",
        schema_version=1,
        data=data,
        metadata_json=b"{}",
        recorded_at=NOW,
    )


def registered(sku: str) -> RecordedEvent:
    return recorded(sku, 0, inventory.ProductRegistered(sku=sku, name=sku, price=Money(100, "EUR"), at=NOW))


def added(sku: str, revision: int, quantity: int) -> RecordedEvent:
    return recorded(sku, revision, inventory.StockAdded(sku=sku, quantity=quantity, at=NOW))


def plan(
    events: list[RecordedEvent],
    stored: dict[str, Stored] | None = None,
    missing: projection_plan.Missing | None = None,
    *,
    hold: bool = True,
) -> projection_plan.Plan:
    decoded = projection_plan.decode(PROJECTION, registry, events)
    return projection_plan.plan(PROJECTION, registry, decoded, stored or {}, missing or {}, hold=hold)


def test_a_run_of_one_stream_is_one_write() -> None:
    events = [registered("A"), *(added("A", r, r) for r in range(1, 6))]
    result = plan(events)
    (write,) = result.writes
    assert isinstance(write.op, Upsert)
    assert (write.op.version, write.op.document["on_hand"], write.applied) == (5, 15, 6)
    assert write.events == events
    assert (result.failed, result.held, result.done) == ([], [], [])


def test_events_at_or_below_the_stored_version_are_done_without_a_write() -> None:
    stored_doc = plan([registered("A"), added("A", 1, 1)]).writes[0].op
    assert isinstance(stored_doc, Upsert)
    stored = {"A": Stored(version=1, document=stored_doc.document)}
    again = [registered("A"), added("A", 1, 1)]
    result = plan(again, stored)
    assert (result.writes, result.done) == ([], again)
    (write,) = plan([*again, added("A", 2, 4)], stored).writes
    assert isinstance(write.op, Upsert)
    assert (write.op.version, write.op.document["on_hand"], write.applied) == (2, 5, 1)


def test_after_a_failed_event_the_rest_of_its_stream_is_held_and_other_streams_go_on() -> None:
    bad = recorded("A", 2)
    events = [registered("A"), added("A", 1, 1), registered("B"), bad, added("A", 3, 4), added("B", 1, 7)]
    result = plan(events)
    assert [e for e, _ in result.failed] == [bad]
    assert result.held == [events[4]]
    by_id = {w.op.id: w.op for w in result.writes}
    assert isinstance(by_id["A"], Upsert)
    assert isinstance(by_id["B"], Upsert)
    assert (by_id["A"].version, by_id["A"].document["on_hand"]) == (1, 1)  # before the failed event
    assert by_id["B"].document["on_hand"] == 7


def test_a_rebuild_folds_on_after_a_failed_event() -> None:
    bad = recorded("A", 2)
    result = plan([registered("A"), added("A", 1, 1), bad, added("A", 3, 4)], hold=False)
    assert [e for e, _ in result.failed] == [bad]
    assert result.held == []
    (write,) = result.writes
    assert isinstance(write.op, Upsert)
    assert (write.op.version, write.op.document["on_hand"]) == (3, 5)


def test_a_document_that_missed_revisions_gets_them_folded_first() -> None:
    first = plan([registered("A")]).writes[0].op
    assert isinstance(first, Upsert)
    stored = {"A": Stored(version=0, document=first.document)}
    late = added("A", 3, 100)
    decoded = projection_plan.decode(PROJECTION, registry, [late])
    assert projection_plan.gaps(PROJECTION, decoded, stored) == [Gap("product-A", 1, 3)]
    missing = {Gap("product-A", 1, 3): [added("A", 1, 1), added("A", 2, 10)]}
    (write,) = plan([late], stored, missing).writes
    assert isinstance(write.op, Upsert)
    assert (write.op.version, write.op.document["on_hand"], write.applied) == (3, 111, 3)
