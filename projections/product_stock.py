"""Read model ``products``: one document per SKU, for ``GET /products``.

Document::

    {"sku", "name", "price", "on_hand", "reserved", "available", "reservations",
     "revision", "position", "updated_at", "search_text"}

``reservations`` maps order id -> reserved quantity (as the aggregate does), so
a release or commit takes back exactly what that order held; ``reserved`` is
their sum and ``available = on_hand - reserved``. ``price`` is an amount in
minor units beside its currency. The stock figures, the price and
``updated_at`` are indexed for analysts; ``reservations`` (a map keyed by order
id) is kept in the source only, as an index of it would grow a field per order.
"""

from __future__ import annotations

from orderstream.readstore.base import CollectionSchema, Document, FieldGroup, FieldKind, SortField
from projections.base import ProjectedEvent, ProjectionError, stream_id

NAME = "products"
CATEGORY = "product"

SCHEMA = CollectionSchema(
    name=NAME,
    version=2,
    id_field="sku",
    fields={
        "sku": FieldKind.KEYWORD,
        "name": FieldKind.TEXT,
        "search_text": FieldKind.TEXT,
        "available": FieldKind.INTEGER,
        "on_hand": FieldKind.INTEGER,
    },
    default_sort=(SortField("sku"),),
    analysis={
        "price": FieldGroup(fields={"amount": FieldKind.INTEGER, "currency": FieldKind.KEYWORD}),
        "reserved": FieldKind.INTEGER,
        "updated_at": FieldKind.DATETIME,
    },
)
"""Version 2 indexes price, reserved and updated_at for analysts."""

HANDLES = frozenset({"ProductRegistered", "StockAdded", "StockReserved", "StockReleased", "StockCommitted"})


def _with_stock(doc: Document, on_hand: int, reservations: dict[str, int]) -> Document:
    reserved = sum(reservations.values())
    return {
        **doc,
        "on_hand": on_hand,
        "reservations": reservations,
        "reserved": reserved,
        "available": on_hand - reserved,
    }


class ProductStockProjection:
    """Pure fold of a product stream into its stock document."""

    schema = SCHEMA
    handles: frozenset[str] = HANDLES
    categories: tuple[str, ...] = (CATEGORY,)
    contiguous = True
    """One stream per document; the document's version is the stream revision."""

    def document_id(self, event: ProjectedEvent) -> str:
        return stream_id(event, CATEGORY)

    def fold(self, document: Document | None, event: ProjectedEvent) -> Document | None:
        sku = self.document_id(event)
        data = event.data
        at = data.get("at")
        if event.type == "ProductRegistered":
            price = data["price"]
            doc: Document = _with_stock(
                {
                    "sku": sku,
                    "name": data["name"],
                    "price": {"amount": int(price["amount"]), "currency": price["currency"]},
                },
                0,
                {},
            )
        elif event.type not in HANDLES:
            raise ProjectionError(f"{NAME} does not handle {event.type}")
        elif document is None:
            raise ProjectionError(f"{event.type} for product {sku}, which was never registered")
        else:
            on_hand = int(document.get("on_hand", 0))
            reservations = {str(k): int(v) for k, v in (document.get("reservations") or {}).items()}
            quantity = int(data["quantity"])
            if event.type == "StockAdded":
                on_hand += quantity
            elif event.type == "StockReserved":
                reservations[str(data["order_id"])] = quantity
            elif event.type == "StockReleased":
                reservations.pop(str(data["order_id"]), None)
            else:  # StockCommitted: the units leave the warehouse
                reservations.pop(str(data["order_id"]), None)
                on_hand -= quantity
            doc = _with_stock(document, on_hand, reservations)
        doc["revision"] = event.revision
        doc["position"] = event.position
        doc["updated_at"] = at if isinstance(at, str) else event.recorded_at_iso
        doc["search_text"] = f"{doc['sku']} {doc.get('name', '')}".strip()
        return doc


projection = ProductStockProjection()
