"""The projections are pure folds: given events (as stored, decoded by the registry), then a document."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from orderstream.application.projection_runner import EventView, fold_events
from orderstream.domain import inventory, orders
from orderstream.domain.common import Money
from orderstream.events import registry
from orderstream.eventstore.base import RecordedEvent
from orderstream.readstore.base import Document, FieldGroup, FieldKind
from projections import order_summary, product_stock
from projections import registry as projection_registry
from projections.base import Projection, ProjectionError

T0 = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
EUR = "EUR"
ADDRESS = orders.Address(
    name="Ada Lovelace", line1="1 Analytical St", city="London", postal_code="N1 9GU", country="GB"
)


def at(minutes: int) -> datetime:
    return T0 + timedelta(minutes=minutes)


def recorded(stream: str, revision: int, event: msgspec.Struct, *, position: int | None = None) -> EventView:
    new = registry.to_new_event(event, event_id=uuid.uuid4())
    return EventView.from_recorded(
        RecordedEvent(
            id=new.id,
            stream=stream,
            revision=revision,
            position=position if position is not None else 100 + revision,
            type=new.type,
            schema_version=new.schema_version,
            data=new.data,
            metadata_json=new.metadata.to_json(),
            recorded_at=at(revision),
        )
    )


def replay(projection: Projection, events: Sequence[EventView]) -> Document | None:
    doc: Document | None = None
    for event in events:
        doc = projection.fold(doc, event)
    return doc


# --------------------------------------------------------------------------- orders

ORDER = "o-1"
STREAM = orders.stream_name(ORDER)


def placed(revision: int = 0) -> EventView:
    lines = (
        orders.OrderLine(sku="SKU-1", quantity=2, unit_price=Money(1250, EUR), name="Assam tea"),
        orders.OrderLine(sku="MUG.blue", quantity=1, unit_price=Money(500, EUR), name="Blue mug"),
    )
    return recorded(
        STREAM,
        revision,
        orders.OrderPlaced(
            order_id=ORDER,
            customer_id="cust-42",
            lines=lines,
            total=orders.total_of(lines),
            shipping_address=ADDRESS,
            payment_method_id="pm_sbx_approve_5ec2e7",
            placed_at=T0,
        ),
    )


def order_events() -> list[EventView]:
    return [
        placed(),
        recorded(STREAM, 1, orders.OrderStockReserved(order_id=ORDER, at=at(1))),
        recorded(STREAM, 2, orders.OrderPaymentAuthorised(order_id=ORDER, payment_id="pay-9", at=at(2))),
        recorded(STREAM, 3, orders.OrderConfirmed(order_id=ORDER, at=at(3))),
        recorded(STREAM, 4, orders.OrderShipped(order_id=ORDER, tracking_number="TRK-1", at=at(4))),
    ]


def test_order_placed_creates_the_summary() -> None:
    doc = order_summary.projection.fold(None, placed())
    assert doc is not None
    assert order_summary.projection.document_id(placed()) == ORDER
    assert doc["id"] == ORDER
    assert doc["customer_id"] == "cust-42"
    assert doc["status"] == "placed"
    assert doc["lines"] == [
        {
            "sku": "SKU-1",
            "name": "Assam tea",
            "quantity": 2,
            "unit_price": {"amount": 1250, "currency": EUR},
            "subtotal": {"amount": 2500, "currency": EUR},
        },
        {
            "sku": "MUG.blue",
            "name": "Blue mug",
            "quantity": 1,
            "unit_price": {"amount": 500, "currency": EUR},
            "subtotal": {"amount": 500, "currency": EUR},
        },
    ]
    assert doc["skus"] == ["MUG.blue", "SKU-1"]
    assert doc["total"] == {"amount": 3000, "currency": EUR}
    assert (doc["total_amount"], doc["total_currency"]) == (3000, EUR)
    assert doc["shipping_address"]["city"] == "London"
    assert doc["placed_at"] == doc["updated_at"] == "2024-05-01T09:00:00Z"
    assert doc["revision"] == 0
    assert doc["position"] == 100
    assert doc["status_history"] == [{"status": "placed", "at": "2024-05-01T09:00:00Z", "revision": 0}]
    for word in (
        "cust-42",
        "SKU-1",
        "MUG.blue",
        "Assam tea",
        "Blue mug",
        "Ada Lovelace",
        "London",
        "N1 9GU",
        "GB",
    ):
        assert word in doc["search_text"]
    assert "tok_secret" not in msgspec.json.encode(doc).decode(), "the payment token stays on the write side"


def test_the_happy_path_records_every_status() -> None:
    doc = replay(order_summary.projection, order_events())
    assert doc is not None
    assert doc["status"] == "shipped"
    assert doc["payment_id"] == "pay-9"
    assert doc["tracking_number"] == "TRK-1"
    assert doc["revision"] == 4
    assert doc["position"] == 104
    assert doc["updated_at"] == "2024-05-01T09:04:00Z"
    assert doc["placed_at"] == "2024-05-01T09:00:00Z"
    assert [(h["status"], h["revision"]) for h in doc["status_history"]] == [
        ("placed", 0),
        ("stock_reserved", 1),
        ("payment_authorised", 2),
        ("confirmed", 3),
        ("shipped", 4),
    ]
    assert doc["status_history"][2]["at"] == "2024-05-01T09:02:00Z"
    assert doc["placed_to_reserved_seconds"] == 60
    assert doc["placed_to_shipped_seconds"] == 240


def test_durations_are_only_there_once_the_status_is_reached() -> None:
    doc = replay(order_summary.projection, order_events()[:2])
    assert doc is not None
    assert doc["placed_to_reserved_seconds"] == 60
    assert "placed_to_shipped_seconds" not in doc


def test_order_rejected() -> None:
    doc = replay(
        order_summary.projection,
        [placed(), recorded(STREAM, 1, orders.OrderRejected(order_id=ORDER, reason="stock short", at=at(1)))],
    )
    assert doc is not None
    assert doc["status"] == "rejected"
    assert doc["reject_reason"] == "stock short"
    assert "cancel_reason" not in doc


def test_order_cancelled() -> None:
    cancelled = orders.OrderCancelled(
        order_id=ORDER, reason="changed my mind", previous_status="placed", at=at(1)
    )
    doc = replay(order_summary.projection, [placed(), recorded(STREAM, 1, cancelled)])
    assert doc is not None
    assert doc["status"] == "cancelled"
    assert doc["cancel_reason"] == "changed my mind"
    assert doc["status_history"][-1] == {"status": "cancelled", "at": "2024-05-01T09:01:00Z", "revision": 1}


def test_order_lines_changed() -> None:
    lines = (orders.OrderLine(sku="HAT-7", quantity=3, unit_price=Money(999, EUR), name="Felt hat"),)
    changed = orders.OrderLinesChanged(order_id=ORDER, lines=lines, total=orders.total_of(lines), at=at(5))
    doc = replay(order_summary.projection, [placed(), recorded(STREAM, 1, changed)])
    assert doc is not None
    assert doc["lines"] == [
        {
            "sku": "HAT-7",
            "name": "Felt hat",
            "quantity": 3,
            "unit_price": {"amount": 999, "currency": EUR},
            "subtotal": {"amount": 2997, "currency": EUR},
        }
    ]
    assert doc["total_amount"] == 2997
    assert doc["status"] == "placed"
    assert len(doc["status_history"]) == 1
    assert doc["skus"] == ["HAT-7"]
    assert "HAT-7" in doc["search_text"]
    assert "Felt hat" in doc["search_text"]
    assert "SKU-1" not in doc["search_text"]
    assert "Assam" not in doc["search_text"]
    assert doc["updated_at"] == "2024-05-01T09:05:00Z"


def test_order_shipping_address_changed() -> None:
    new_address = orders.Address(
        name="Charles Babbage", line1="2 Engine Rd", city="Paris", postal_code="75001", country="FR"
    )
    changed = orders.OrderShippingAddressChanged(order_id=ORDER, shipping_address=new_address, at=at(6))
    doc = replay(order_summary.projection, [placed(), recorded(STREAM, 1, changed)])
    assert doc is not None
    assert doc["shipping_address"]["city"] == "Paris"
    assert "Paris" in doc["search_text"]
    assert "London" not in doc["search_text"]
    assert doc["revision"] == 1


def test_fold_does_not_mutate_its_input() -> None:
    doc = order_summary.projection.fold(None, placed())
    assert doc is not None
    before = msgspec.json.encode(doc)
    order_summary.projection.fold(
        doc, recorded(STREAM, 1, orders.OrderStockReserved(order_id=ORDER, at=at(1)))
    )
    assert msgspec.json.encode(doc) == before


def test_a_change_to_an_order_never_placed_is_an_error() -> None:
    with pytest.raises(ProjectionError):
        order_summary.projection.fold(
            None, recorded(STREAM, 3, orders.OrderConfirmed(order_id=ORDER, at=at(1)))
        )


def test_old_order_placed_v1_still_projects() -> None:
    """A v1 OrderPlaced (no payment token) is upcast by the registry before folding."""
    v2 = placed()
    raw = dict(v2.data)
    raw.pop("payment_method_id")
    v1 = EventView.from_recorded(
        RecordedEvent(
            id=uuid.uuid4(),
            stream=STREAM,
            revision=0,
            position=1,
            type="OrderPlaced",
            schema_version=1,
            data=msgspec.json.encode(raw),
            metadata_json=b"{}",
            recorded_at=T0,
        )
    )
    doc = order_summary.projection.fold(None, v1)
    assert doc is not None
    assert doc["status"] == "placed"


def test_order_placed_v2_without_product_names_still_projects() -> None:
    """Lines stored before they carried the product's name: no ``name``, no name in the text."""
    v3 = placed()
    raw = dict(v3.data)
    raw["lines"] = [{k: v for k, v in line.items() if k != "name"} for line in raw["lines"]]
    v2 = EventView.from_recorded(
        RecordedEvent(
            id=uuid.uuid4(),
            stream=STREAM,
            revision=0,
            position=1,
            type="OrderPlaced",
            schema_version=2,
            data=msgspec.json.encode(raw),
            metadata_json=b"{}",
            recorded_at=T0,
        )
    )
    doc = order_summary.projection.fold(None, v2)
    assert doc is not None
    assert [line["sku"] for line in doc["lines"]] == ["SKU-1", "MUG.blue"]
    assert all("name" not in line for line in doc["lines"])
    assert "Assam" not in doc["search_text"]
    assert "SKU-1" in doc["search_text"]


def test_every_order_event_type_is_handled() -> None:
    names = {n for n in registry.names() if n.startswith("Order")}
    assert order_summary.projection.handles == names


# ------------------------------------------------------------------------- products

SKU = "SKU-1"
PSTREAM = inventory.stream_name(SKU)


def product_events() -> list[EventView]:
    return [
        recorded(
            PSTREAM,
            0,
            inventory.ProductRegistered(sku=SKU, name="Blue cotton shirt", price=Money(1250, EUR), at=T0),
        ),
        recorded(PSTREAM, 1, inventory.StockAdded(sku=SKU, quantity=10, at=at(1))),
        recorded(PSTREAM, 2, inventory.StockReserved(sku=SKU, order_id="o-1", quantity=3, at=at(2))),
        recorded(PSTREAM, 3, inventory.StockReserved(sku=SKU, order_id="o-2", quantity=2, at=at(3))),
    ]


def test_product_registered() -> None:
    doc = product_stock.projection.fold(None, product_events()[0])
    assert doc is not None
    assert doc["sku"] == SKU
    assert doc["name"] == "Blue cotton shirt"
    assert doc["price"] == {"amount": 1250, "currency": EUR}
    assert (doc["on_hand"], doc["reserved"], doc["available"]) == (0, 0, 0)
    assert doc["revision"] == 0
    assert doc["updated_at"] == "2024-05-01T09:00:00Z"
    assert SKU in doc["search_text"]
    assert "shirt" in doc["search_text"]


def test_stock_added_and_reserved() -> None:
    doc = replay(product_stock.projection, product_events())
    assert doc is not None
    assert (doc["on_hand"], doc["reserved"], doc["available"]) == (10, 5, 5)
    assert doc["reservations"] == {"o-1": 3, "o-2": 2}
    assert doc["revision"] == 3
    assert doc["position"] == 103


def test_stock_released_gives_back_that_order_s_reservation() -> None:
    released = inventory.StockReleased(
        sku=SKU, order_id="o-1", quantity=3, reason="payment declined", at=at(4)
    )
    doc = replay(product_stock.projection, [*product_events(), recorded(PSTREAM, 4, released)])
    assert doc is not None
    assert (doc["on_hand"], doc["reserved"], doc["available"]) == (10, 2, 8)
    assert doc["reservations"] == {"o-2": 2}


def test_stock_committed_takes_the_units_off_the_shelf() -> None:
    committed = inventory.StockCommitted(sku=SKU, order_id="o-2", quantity=2, at=at(4))
    doc = replay(product_stock.projection, [*product_events(), recorded(PSTREAM, 4, committed)])
    assert doc is not None
    assert (doc["on_hand"], doc["reserved"], doc["available"]) == (8, 3, 5)
    assert doc["reservations"] == {"o-1": 3}


def test_projection_matches_the_aggregate() -> None:
    """The read model agrees with the write model's own evolve on the same events."""
    events: list[inventory.InventoryEvent] = [
        inventory.ProductRegistered(sku=SKU, name="Shirt", price=Money(1, EUR), at=T0),
        inventory.StockAdded(sku=SKU, quantity=50, at=T0),
        inventory.StockReserved(sku=SKU, order_id="a", quantity=5, at=T0),
        inventory.StockReserved(sku=SKU, order_id="b", quantity=7, at=T0),
        inventory.StockCommitted(sku=SKU, order_id="a", quantity=5, at=T0),
        inventory.StockReleased(sku=SKU, order_id="b", quantity=7, reason="x", at=T0),
        inventory.StockReserved(sku=SKU, order_id="c", quantity=4, at=T0),
        inventory.StockAdded(sku=SKU, quantity=3, at=T0),
    ]
    state = inventory.initial_state
    for event in events:
        state = inventory.evolve(state, event)
    doc = replay(product_stock.projection, [recorded(PSTREAM, r, e) for r, e in enumerate(events)])
    assert doc is not None
    assert (doc["on_hand"], doc["reserved"], doc["available"]) == (
        state.on_hand,
        state.reserved,
        state.available,
    )


def test_stock_for_an_unregistered_product_is_an_error() -> None:
    with pytest.raises(ProjectionError):
        product_stock.projection.fold(None, product_events()[1])


# ---------------------------------------------------------------- runner logic (pure)


@pytest.mark.parametrize(
    ("projection", "events"),
    [(order_summary.projection, order_events), (product_stock.projection, product_events)],
)
def test_replaying_the_same_events_changes_nothing(
    projection: Projection, events: Callable[[], list[EventView]]
) -> None:
    stream = events()
    doc, version, applied = fold_events(projection, None, None, stream)
    assert applied == len(stream)
    assert version == stream[-1].revision
    again, again_version, again_applied = fold_events(projection, doc, version, stream)
    assert (again, again_version, again_applied) == (doc, version, 0)
    # Each event delivered twice in a row is applied once.
    doubled = [e for event in stream for e in (event, event)]
    twice, twice_version, twice_applied = fold_events(projection, None, None, doubled)
    assert (twice, twice_version, twice_applied) == (doc, version, len(stream))


def test_an_older_event_after_a_newer_one_is_skipped() -> None:
    stream = product_events()
    doc, version, _ = fold_events(product_stock.projection, None, None, stream)
    late, late_version, applied = fold_events(product_stock.projection, doc, version, [stream[1]])
    assert applied == 0
    assert (late, late_version) == (doc, version)


# ----------------------------------------------------------------------- declarations


def test_registry() -> None:
    assert projection_registry.get("orders") is order_summary.projection
    assert projection_registry.get("products") is product_stock.projection
    assert {p.schema.name for p in projection_registry.ALL_PROJECTIONS} == {"orders", "products"}
    with pytest.raises(KeyError):
        projection_registry.get("nope")


@pytest.mark.parametrize("projection", projection_registry.ALL_PROJECTIONS, ids=lambda p: p.schema.name)
def test_declarations_are_consistent(projection: Projection) -> None:
    schema = projection.schema
    assert projection.handles <= set(registry.names())
    for sort in schema.default_sort:
        assert schema.fields[sort.field] is not FieldKind.TEXT
    assert any(kind is FieldKind.TEXT for kind in schema.fields.values())


def test_queried_fields_are_top_level_document_fields() -> None:
    order = replay(order_summary.projection, order_events())
    product = replay(product_stock.projection, product_events())
    assert order is not None
    assert product is not None
    assert set(order_summary.SCHEMA.fields) <= set(order)
    assert set(product_stock.SCHEMA.fields) <= set(product)
    assert order[order_summary.SCHEMA.id_field] == ORDER
    assert product[product_stock.SCHEMA.id_field] == SKU


def _values(doc: object, path: list[str]) -> list[object]:
    """The values at a dotted path, through lists (as Elasticsearch reads ``lines.sku``)."""
    if isinstance(doc, list):
        return [v for item in doc for v in _values(item, path)]
    if not path:
        return [doc]
    if not isinstance(doc, dict) or path[0] not in doc:
        return []
    return _values(doc[path[0]], path[1:])


def _leaves(fields: Mapping[str, FieldKind | FieldGroup], prefix: str = "") -> dict[str, FieldKind]:
    found: dict[str, FieldKind] = {}
    for name, field in fields.items():
        if isinstance(field, FieldGroup):
            found.update(_leaves(field.fields, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = field
    return found


_KIND_CHECKS: dict[FieldKind, Callable[[object], bool]] = {
    FieldKind.KEYWORD: lambda v: isinstance(v, str),
    FieldKind.TEXT: lambda v: isinstance(v, str),
    FieldKind.INTEGER: lambda v: isinstance(v, int) and not isinstance(v, bool),
    FieldKind.DATETIME: lambda v: isinstance(v, str) and datetime.fromisoformat(v) is not None,
}


def test_analysis_fields_are_filled_with_values_of_their_kind() -> None:
    """Every field indexed for analysts appears in a document that went through the
    whole life of an order (or a product) and holds values of its declared kind."""
    cancelled = orders.OrderCancelled(order_id=ORDER, reason="too slow", previous_status="shipped", at=at(9))
    rejected_doc = replay(
        order_summary.projection,
        [placed(), recorded(STREAM, 1, orders.OrderRejected(order_id=ORDER, reason="no stock", at=at(1)))],
    )
    order = replay(order_summary.projection, [*order_events(), recorded(STREAM, 5, cancelled)])
    product = replay(product_stock.projection, product_events())
    assert order is not None
    assert rejected_doc is not None
    assert product is not None
    cases = [(order_summary.SCHEMA, {**rejected_doc, **order}), (product_stock.SCHEMA, product)]
    for schema, doc in cases:
        for path, kind in _leaves(schema.analysis).items():
            values = _values(doc, path.split("."))
            assert values, f"{schema.name}: no value at {path}"
            assert all(_KIND_CHECKS[kind](v) for v in values), f"{schema.name}.{path}: {values!r} not {kind}"


def test_amounts_always_stand_beside_their_currency() -> None:
    for schema in (order_summary.SCHEMA, product_stock.SCHEMA):
        leaves = _leaves(schema.analysis)
        for path in leaves:
            if path.endswith(".amount"):
                assert leaves[path.removesuffix("amount") + "currency"] is FieldKind.KEYWORD
    assert order_summary.SCHEMA.analysis["total_currency"] is FieldKind.KEYWORD
