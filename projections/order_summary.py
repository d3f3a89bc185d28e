"""Read model ``orders``: one document per order, for ``GET /orders`` and ``GET /orders/{id}``,
and for analysts reading the Elasticsearch index (Kibana).

Document::

    {"id", "customer_id", "status",
     "lines": [{"sku", "name"?, "quantity", "unit_price": {"amount", "currency"},
                "subtotal": {"amount", "currency"}}],
     "skus", "total": {"amount", "currency"}, "total_amount", "total_currency",
     "shipping_address", "placed_at", "updated_at",
     "cancel_reason"?, "reject_reason"?, "tracking_number"?, "payment_id"?,
     "placed_to_reserved_seconds"?, "placed_to_shipped_seconds"?,
     "revision", "position", "status_history": [{"status", "at", "revision"}], "search_text"}

``revision`` is the stream revision of the last event applied (the document's
write version) and ``position`` its commit position. Money is always an amount
in minor units beside its currency: ``total_amount`` flattens ``total.amount``
so the API can filter and sort on it, and ``total_currency`` stands beside it so
no sum ever adds euros to dollars (group by the currency first). ``skus`` lists
the lines' SKUs as a keyword array, for tools that cannot aggregate nested
lines (Kibana Lens). The durations are whole seconds from ``placed_at`` to the
first time the order reached that status. ``search_text`` holds the customer id,
the SKUs, the product names the lines carry, and the address name, city,
postal code and country; the payment token never reaches the read side.

Product names come from the event (``OrderLine.name``, recorded when the order
was placed), never from the products read model: a lookup there would give a
different document on a replay after a rename. Orders placed before lines
carried names have no ``name`` on their lines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from orderstream.readstore.base import CollectionSchema, Document, FieldGroup, FieldKind, SortField
from projections.base import ProjectedEvent, ProjectionError, stream_id

NAME = "orders"
CATEGORY = "order"

_MONEY = FieldGroup(fields={"amount": FieldKind.INTEGER, "currency": FieldKind.KEYWORD})

SCHEMA = CollectionSchema(
    name=NAME,
    version=2,
    id_field="id",
    fields={
        "customer_id": FieldKind.KEYWORD,
        "status": FieldKind.KEYWORD,
        "placed_at": FieldKind.DATETIME,
        "updated_at": FieldKind.DATETIME,
        "total_amount": FieldKind.INTEGER,
        "search_text": FieldKind.TEXT,
    },
    default_sort=(SortField("placed_at", descending=True),),
    analysis={
        "total": _MONEY,
        "total_currency": FieldKind.KEYWORD,
        "lines": FieldGroup(
            nested=True,
            fields={
                "sku": FieldKind.KEYWORD,
                "name": FieldKind.TEXT,
                "quantity": FieldKind.INTEGER,
                "unit_price": _MONEY,
                "subtotal": _MONEY,
            },
        ),
        "skus": FieldKind.KEYWORD,
        "shipping_address": FieldGroup(
            fields={
                "country": FieldKind.KEYWORD,
                "city": FieldKind.KEYWORD,
                "postal_code": FieldKind.KEYWORD,
            }
        ),
        "status_history": FieldGroup(
            nested=True,
            fields={"status": FieldKind.KEYWORD, "at": FieldKind.DATETIME, "revision": FieldKind.INTEGER},
        ),
        "placed_to_reserved_seconds": FieldKind.INTEGER,
        "placed_to_shipped_seconds": FieldKind.INTEGER,
        "cancel_reason": FieldKind.TEXT,
        "reject_reason": FieldKind.TEXT,
        "payment_id": FieldKind.KEYWORD,
        "tracking_number": FieldKind.KEYWORD,
    },
)
"""Version 2 indexes the analysis fields (version 1 indexed only the queried ones)."""

DURATIONS = {"stock_reserved": "placed_to_reserved_seconds", "shipped": "placed_to_shipped_seconds"}
"""Status -> the document field holding the seconds from placement to reaching it."""


def _lines(raw_lines: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    lines = []
    for line in raw_lines:
        price = line["unit_price"]
        quantity = int(line["quantity"])
        doc_line: dict[str, Any] = {"sku": line["sku"]}
        if line.get("name"):
            doc_line["name"] = line["name"]
        doc_line["quantity"] = quantity
        doc_line["unit_price"] = {"amount": int(price["amount"]), "currency": price["currency"]}
        doc_line["subtotal"] = {"amount": int(price["amount"]) * quantity, "currency": price["currency"]}
        lines.append(doc_line)
    return lines


def _with_lines(doc: Document, raw_lines: list[Mapping[str, Any]], raw_total: Mapping[str, Any]) -> Document:
    """The lines, their SKUs and the total (amount and currency side by side)."""
    lines = _lines(raw_lines)
    total = _money(raw_total)
    return {
        **doc,
        "lines": lines,
        "skus": sorted({line["sku"] for line in lines}),
        "total": total,
        "total_amount": total["amount"],
        "total_currency": total["currency"],
    }


def _search_text(doc: Mapping[str, Any]) -> str:
    address = doc.get("shipping_address") or {}
    parts = [
        doc.get("customer_id"),
        *(line["sku"] for line in doc.get("lines", ())),
        *(line.get("name") for line in doc.get("lines", ())),
        address.get("name"),
        address.get("city"),
        address.get("postal_code"),
        address.get("country"),
    ]
    return " ".join(str(p) for p in parts if p)


def _money(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {"amount": int(raw["amount"]), "currency": raw["currency"]}


def _placed(event: ProjectedEvent, order_id: str) -> Document:
    data = event.data
    doc: Document = {
        "id": order_id,
        "customer_id": data["customer_id"],
        "status": "placed",
        "shipping_address": dict(data["shipping_address"]),
        "placed_at": data["placed_at"],
        "updated_at": data["placed_at"],
        "status_history": [{"status": "placed", "at": data["placed_at"], "revision": event.revision}],
    }
    return _with_lines(doc, data["lines"], data["total"])


def _seconds_between(start: str, end: str) -> int:
    return int((datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds())


def _status(status: str, **extra: str) -> Callable[[Document, ProjectedEvent], Document]:
    """A fold step that moves the order to ``status`` and copies ``extra`` doc keys
    from the named event fields."""

    def step(doc: Document, event: ProjectedEvent) -> Document:
        at = _at(event)
        changed = {key: event.data[field] for key, field in extra.items()}
        duration = DURATIONS.get(status)
        if duration and duration not in doc:  # the first time only
            changed[duration] = _seconds_between(doc["placed_at"], at)
        history = [*doc.get("status_history", ()), {"status": status, "at": at, "revision": event.revision}]
        return {**doc, **changed, "status": status, "status_history": history}

    return step


def _lines_changed(doc: Document, event: ProjectedEvent) -> Document:
    return _with_lines(doc, event.data["lines"], event.data["total"])


def _address_changed(doc: Document, event: ProjectedEvent) -> Document:
    return {**doc, "shipping_address": dict(event.data["shipping_address"])}


_STEPS: dict[str, Callable[[Document, ProjectedEvent], Document]] = {
    "OrderLinesChanged": _lines_changed,
    "OrderShippingAddressChanged": _address_changed,
    "OrderStockReserved": _status("stock_reserved"),
    "OrderPaymentAuthorised": _status("payment_authorised", payment_id="payment_id"),
    "OrderConfirmed": _status("confirmed"),
    "OrderShipped": _status("shipped", tracking_number="tracking_number"),
    "OrderRejected": _status("rejected", reject_reason="reason"),
    "OrderCancelled": _status("cancelled", cancel_reason="reason"),
}


def _at(event: ProjectedEvent) -> str:
    at = event.data.get("at")
    return at if isinstance(at, str) else event.recorded_at_iso


class OrderSummaryProjection:
    """Pure fold of the order stream into its summary document."""

    schema = SCHEMA
    handles: frozenset[str] = frozenset({"OrderPlaced", *_STEPS})
    categories: tuple[str, ...] = (CATEGORY,)
    contiguous = True
    """One stream per document; the document's version is the stream revision."""

    def document_id(self, event: ProjectedEvent) -> str:
        return stream_id(event, CATEGORY)

    def fold(self, document: Document | None, event: ProjectedEvent) -> Document | None:
        order_id = self.document_id(event)
        if event.type == "OrderPlaced":
            doc = _placed(event, order_id)
        else:
            step = _STEPS.get(event.type)
            if step is None:
                raise ProjectionError(f"{NAME} does not handle {event.type}")
            if document is None:
                raise ProjectionError(f"{event.type} for order {order_id}, which was never placed")
            doc = step(document, event)
            doc["updated_at"] = _at(event)
        doc["revision"] = event.revision
        doc["position"] = event.position
        doc["search_text"] = _search_text(doc)
        return doc


projection = OrderSummaryProjection()
