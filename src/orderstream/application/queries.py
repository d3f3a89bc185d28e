"""Query handling: read models for get/list/search, the event store for history.

Read-your-writes: every write answers with the commit ``position`` of its last
event. A query given ``min_position`` waits (at most the consistency timeout)
until the projection it reads has applied every event up to that position,
and raises :class:`NotYetConsistent` if it has not; the API answers that with
503 and ``Retry-After`` rather than with a stale document, because a stale
answer to a client that asked to see its own write would silently break the
client's logic, while a 503 tells it exactly what to do.

A single document can answer sooner: a document already written at a
position at or beyond ``min_position`` has applied every event of its stream
up to it (projections apply a stream's events in revision order), so no wait
is needed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import msgspec

from orderstream.application.commands import Commands, Loaded
from orderstream.domain import orders
from orderstream.domain.common import NotFound
from orderstream.eventstore.base import EventStore, RecordedEvent
from orderstream.readstore.base import InvalidQuery, Page, Query, ReadStore, SortField

T = TypeVar("T")

ORDERS = "orders"
PRODUCTS = "products"
MAX_LIMIT = 100
MAX_TEXT = 200
ORDER_SORT_FIELDS = frozenset({"placed_at", "updated_at", "total_amount", "customer_id", "status"})
ORDER_FACETS = frozenset({"status"})
PRODUCT_SORT_FIELDS = frozenset({"sku", "available", "on_hand"})
STATUSES: frozenset[str] = frozenset(
    {"placed", "stock_reserved", "payment_authorised", "confirmed", "shipped", "rejected", "cancelled"}
)


class NotYetConsistent(Exception):
    """The projection did not reach ``position`` within the consistency timeout."""

    def __init__(self, projection: str, position: int, reached: int | None) -> None:
        self.projection = projection
        self.position = position
        self.reached = reached
        super().__init__(f"{projection} has reached position {reached}, not yet {position}")


class RevisionNotFound(NotFound):
    """The order exists but has no event at the requested revision (yet)."""

    def __init__(self, ident: str, revision: int, current_revision: int) -> None:
        self.revision = revision
        self.current_revision = current_revision
        super().__init__("order", ident)
        self.args = (f"order {ident} has no revision {revision} (current revision: {current_revision})",)

    def __str__(self) -> str:
        return str(self.args[0])


class PositionTracker(Protocol):
    """What queries need of a projection runner."""

    async def wait_for_position(self, position: int, timeout: float, *, stop_at_parked: bool = True) -> bool:  # noqa: ASYNC109
        """True once every event at or below ``position`` is applied; False on timeout.
        With ``stop_at_parked``, raises at once when a parked event is in the way
        (:class:`~orderstream.application.projection_progress.ParkedEventBlocks`)."""
        ...

    async def reached_position(self) -> int | None:
        """The projection's low-water mark now."""
        ...


@dataclass(frozen=True)
class OrderState:
    order_id: str
    revision: int
    current_revision: int
    state: orders.Order


def parse_sort(raw: str | None, allowed: frozenset[str]) -> tuple[SortField, ...]:
    """``"-placed_at,total_amount"`` -> sort fields; ``-`` means descending."""
    if raw is None or not raw.strip():
        return ()
    fields = []
    for part in raw.split(","):
        part = part.strip()
        descending = part.startswith("-")
        name = part.lstrip("+-")
        if name not in allowed:
            raise InvalidQuery(f"cannot sort by {name!r}; sortable: {', '.join(sorted(allowed))}")
        fields.append(SortField(name, descending=descending))
    if len({f.field for f in fields}) != len(fields):
        raise InvalidQuery("a sort field appears twice")
    return tuple(fields)


def _check_limit(limit: int) -> int:
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidQuery(f"limit must be between 1 and {MAX_LIMIT}")
    return limit


def _check_text(q: str | None) -> str | None:
    if q is None or not q.strip():
        return None
    if len(q) > MAX_TEXT:
        raise InvalidQuery(f"q is limited to {MAX_TEXT} characters")
    return q


class Queries:
    def __init__(
        self,
        *,
        event_store: EventStore,
        read_store: ReadStore,
        handler: Commands,
        trackers: Mapping[str, PositionTracker],
        consistency_timeout: float,
    ) -> None:
        self.event_store = event_store
        self.read_store = read_store
        self.handler = handler
        self.trackers = trackers
        self.consistency_timeout = consistency_timeout

    # ----------------------------------------------------------------- consistency

    async def wait_for(self, collection: str, position: int | None) -> None:
        """Return once ``collection``'s projection has applied everything up to ``position``."""
        if position is None:
            return
        tracker = self.trackers.get(collection)
        if tracker is None:
            raise NotYetConsistent(collection, position, None)
        if await tracker.wait_for_position(position, self.consistency_timeout):
            return
        raise NotYetConsistent(collection, position, await tracker.reached_position())

    async def _get(
        self, collection: str, doc_id: str, min_position: int | None, as_type: type[T]
    ) -> T | None:
        """One document decoded as ``as_type``, at least as fresh as ``min_position``."""
        if min_position is not None:
            await self._wait_for_document(collection, doc_id, min_position)
        return await self.read_store.get_as(collection, doc_id, as_type)

    async def _wait_for_document(self, collection: str, doc_id: str, min_position: int) -> None:
        """Return once the document is fresh enough for ``min_position``: when the
        projection has applied everything up to the position, or when the document
        itself has: its ``position`` is that of the last event folded into it, and a
        projection's document follows one stream in revision order, so every event of
        that stream at or below the position is in it. Only the position is decoded
        (:class:`_Position`). The document is re-read while waiting, so an event parked
        in another stream (which holds the projection-wide mark back) does not fail
        this read. Documents only get fresher, so the read that follows is too."""
        if _fresh(await self.read_store.get_as(collection, doc_id, _Position), min_position):
            return
        tracker = self.trackers.get(collection)
        if tracker is None:
            raise NotYetConsistent(collection, min_position, None)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.consistency_timeout
        while True:
            remaining = deadline - loop.time()
            wait = min(DOCUMENT_RECHECK, max(0.0, remaining))
            if await tracker.wait_for_position(min_position, wait, stop_at_parked=False):
                return
            if _fresh(await self.read_store.get_as(collection, doc_id, _Position), min_position):
                return
            if loop.time() >= deadline:
                raise NotYetConsistent(collection, min_position, await tracker.reached_position())

    # ---------------------------------------------------------------------- orders

    async def get_order(self, order_id: str, *, as_type: type[T], min_position: int | None = None) -> T:
        """The order's document decoded as ``as_type`` (the API's view), straight from
        what the read store holds (``ReadStore.get_as``)."""
        doc = await self._get(ORDERS, order_id, min_position, as_type)
        if doc is None:
            raise NotFound("order", order_id)
        return doc

    async def list_orders(
        self,
        *,
        as_type: type[T],
        customer_id: str | None = None,
        status: Sequence[str] = (),
        q: str | None = None,
        sort: str | None = None,
        cursor: str | None = None,
        limit: int = 20,
        min_position: int | None = None,
        facets: Sequence[str] = (),
    ) -> Page[T]:
        """A page of orders, each decoded as ``as_type`` (``ReadStore.query_as``).
        ``facets`` (``"status"``) asks for counts over every match: they cost a pass
        over the matches, so only a client that shows them pays for them
        (docs/read-models.md)."""
        unknown_facets = sorted(set(facets) - ORDER_FACETS)
        if unknown_facets:
            raise InvalidQuery(
                f"cannot count {', '.join(unknown_facets)}; countable: {', '.join(sorted(ORDER_FACETS))}"
            )
        unknown = sorted(set(status) - STATUSES)
        if unknown:
            raise InvalidQuery(f"unknown status {', '.join(unknown)}; known: {', '.join(sorted(STATUSES))}")
        filters: dict[str, Any] = {}
        if customer_id is not None:  # "" is a customer no order has, not "every customer"
            filters["customer_id"] = customer_id
        if status:
            filters["status"] = list(dict.fromkeys(status))
        query = Query(
            filters=filters,
            text=_check_text(q),
            sort=parse_sort(sort, ORDER_SORT_FIELDS),
            cursor=cursor or None,
            limit=_check_limit(limit),
            facets=tuple(dict.fromkeys(facets)),
        )
        await self.wait_for(ORDERS, min_position)
        return await self.read_store.query_as(ORDERS, query, as_type)

    async def order_events(self, order_id: str) -> list[RecordedEvent]:
        events = await self.event_store.read_stream(orders.stream_name(order_id))
        if not events:
            raise NotFound("order", order_id)
        return events

    async def order_state(self, order_id: str, revision: int | None = None) -> OrderState:
        """The order folded from its events up to ``revision`` (default: all)."""
        stream = orders.stream_name(order_id)
        current = await self.event_store.stream_revision(stream)
        if current is None:
            raise NotFound("order", order_id)
        if revision is not None and revision > current:
            raise RevisionNotFound(order_id, revision, current)
        loaded: Loaded[orders.Order] = await self.handler.load(orders.decider, stream, up_to=revision)
        if loaded.revision is None or loaded.state.status is None:
            raise NotFound("order", order_id)
        return OrderState(order_id, loaded.revision, max(current, loaded.revision), loaded.state)

    # -------------------------------------------------------------------- products

    async def get_product(self, sku: str, *, as_type: type[T], min_position: int | None = None) -> T:
        doc = await self._get(PRODUCTS, sku, min_position, as_type)
        if doc is None:
            raise NotFound("product", sku)
        return doc

    async def list_products(
        self,
        *,
        as_type: type[T],
        q: str | None = None,
        sort: str | None = None,
        cursor: str | None = None,
        limit: int = 20,
        min_position: int | None = None,
    ) -> Page[T]:
        query = Query(
            text=_check_text(q),
            sort=parse_sort(sort, PRODUCT_SORT_FIELDS),
            cursor=cursor or None,
            limit=_check_limit(limit),
        )
        await self.wait_for(PRODUCTS, min_position)
        return await self.read_store.query_as(PRODUCTS, query, as_type)


DOCUMENT_RECHECK = 0.1
"""Seconds between re-reads of a document while a ``min_position`` read waits."""


class _Position(msgspec.Struct, frozen=True):
    """A read-model document's ``position`` alone: what a ``min_position`` read checks."""

    position: int = -1


def _fresh(doc: _Position | None, min_position: int) -> bool:
    return doc is not None and doc.position >= min_position


SECRET_FIELDS = frozenset({"payment_token", "token"})
"""Event fields never shown through the API: the card token that events written
before the payment vault held in clear (``OrderPlaced`` v3, ``PaymentRequested``
v1); newer events hold only the vault's reference (``payment_method_id``)."""
REDACTED = "[redacted]"


def event_data(event: RecordedEvent) -> tuple[dict[str, Any], dict[str, Any]]:
    """An event's data and metadata as stored (JSON objects), secrets redacted."""
    data = msgspec.json.decode(event.data) if event.data else {}
    if not isinstance(data, dict):
        return {"value": data}, msgspec.to_builtins(event.metadata)
    shown = {k: (REDACTED if k in SECRET_FIELDS and v else v) for k, v in data.items()}
    return shown, msgspec.to_builtins(event.metadata)
