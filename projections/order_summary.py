"""Read model ``orders``: one document per order, for ``GET /orders`` and ``GET /orders/{id}``.

Document::

    {"id", "customer_id", "status", "lines": [{"sku", "quantity", "unit_price", "subtotal"}],
     "total", "total_amount", "shipping_address", "placed_at", "updated_at",
     "cancel_reason"?, "reject_reason"?, "tracking_number"?, "payment_id"?,
     "revision", "position", "status_history": [{"status", "at", "revision"}], "search_text"}

``revision`` is the stream revision of the last event applied (the document's
write version) and ``position`` its commit position. ``total_amount`` flattens
``total.amount`` so it can be filtered and sorted. ``search_text`` holds the
customer id, the SKUs and the address name, city and postal code; the payment
token never reaches the read side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from orderstream.readstore.base import CollectionSchema, Document, FieldKind, SortField
from projections.base import ProjectedEvent, ProjectionError, stream_id

NAME = "orders"
CATEGORY = "order"

SCHEMA = CollectionSchema(
    name=NAME,
    version=1,
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
)


def _lines(raw_lines: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    lines = []
    for line in raw_lines:
        price = line["unit_price"]
        quantity = int(line["quantity"])
        lines.append(
            {
                "sku": line["sku"],
                "quantity": quantity,
                "unit_price": {"amount": int(price["amount"]), "currency": price["currency"]},
                "subtotal": {"amount": int(price["amount"]) * quantity, "currency": price["currency"]},
            }
        )
    return lines


def _search_text(doc: Mapping[str, Any]) -> str:
    address = doc.get("shipping_address") or {}
    parts = [
        doc.get("customer_id"),
        *(line["sku"] for line in doc.get("lines", ())),
        address.get("name"),
        address.get("city"),
        address.get("postal_code"),
    ]
    return " ".join(str(p) for p in parts if p)


def _money(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {"amount": int(raw["amount"]), "currency": raw["currency"]}


def _placed(event: ProjectedEvent, order_id: str) -> Document:
    data = event.data
    total = _money(data["total"])
    doc: Document = {
        "id": order_id,
        "customer_id": data["customer_id"],
        "status": "placed",
        "lines": _lines(data["lines"]),
        "total": total,
        "total_amount": total["amount"],
        "shipping_address": dict(data["shipping_address"]),
        "placed_at": data["placed_at"],
        "updated_at": data["placed_at"],
        "status_history": [{"status": "placed", "at": data["placed_at"], "revision": event.revision}],
    }
    return doc


def _status(status: str, **extra: str) -> Callable[[Document, ProjectedEvent], Document]:
    """A fold step that moves the order to ``status`` and copies ``extra`` doc keys
    from the named event fields."""

    def step(doc: Document, event: ProjectedEvent) -> Document:
        at = _at(event)
        changed = {key: event.data[field] for key, field in extra.items()}
        history = [*doc.get("status_history", ()), {"status": status, "at": at, "revision": event.revision}]
        return {**doc, **changed, "status": status, "status_history": history}

    return step


def _lines_changed(doc: Document, event: ProjectedEvent) -> Document:
    total = _money(event.data["total"])
    return {**doc, "lines": _lines(event.data["lines"]), "total": total, "total_amount": total["amount"]}


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
