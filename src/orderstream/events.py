"""Event types on disk: stable names, schema versions, upcasters, (de)serialisation.

An event is stored as readable JSON under a type name chosen on purpose
(``"OrderPlaced"``), never a Python import path, with its schema version beside
it. Reading runs the raw dict through the upcasters registered for that type,
``v1 -> v2 -> ...`` up to the current version, before msgspec decodes it into
the current Struct. Old fixtures under ``tests/fixtures/events`` prove that
stored events keep loading.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from orderstream.domain import inventory, orders, payments
from orderstream.eventstore.base import EMPTY_METADATA, EventMetadata, NewEvent, RecordedEvent

RawEvent = dict[str, Any]
Upcaster = Callable[[RawEvent], RawEvent]


class UnknownEventType(Exception):
    def __init__(self, type_name: str) -> None:
        self.type_name = type_name
        super().__init__(f"no event type registered as {type_name!r}")


class EventDecodeError(Exception):
    """Stored data that does not match its type's schema, even after upcasting."""


@dataclass
class EventType:
    name: str
    cls: type[msgspec.Struct]
    version: int = 1
    upcasters: dict[int, Upcaster] = field(default_factory=dict)
    """``upcasters[n]`` turns version ``n`` into version ``n + 1``."""
    decoder: msgspec.json.Decoder[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.decoder = msgspec.json.Decoder(self.cls)


class EventRegistry:
    def __init__(self) -> None:
        self._by_name: dict[str, EventType] = {}
        self._by_cls: dict[type[msgspec.Struct], EventType] = {}
        self._encoder = msgspec.json.Encoder()

    def register(self, cls: type[msgspec.Struct], *, name: str | None = None, version: int = 1) -> None:
        entry = EventType(name or cls.__name__, cls, version)
        if entry.name in self._by_name:
            raise ValueError(f"event type {entry.name!r} registered twice")
        self._by_name[entry.name] = entry
        self._by_cls[cls] = entry

    def upcaster(self, name: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: register the step ``from_version -> from_version + 1`` of ``name``."""

        def add(fn: Upcaster) -> Upcaster:
            entry = self[name]
            if from_version >= entry.version:
                raise ValueError(
                    f"{name} is at version {entry.version}; nothing to upcast from {from_version}"
                )
            entry.upcasters[from_version] = fn
            return fn

        return add

    def __getitem__(self, name: str) -> EventType:
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownEventType(name) from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def type_name(self, event: msgspec.Struct) -> str:
        return self._by_cls[type(event)].name

    def to_new_event(
        self, event: msgspec.Struct, *, event_id: uuid.UUID, metadata: EventMetadata = EMPTY_METADATA
    ) -> NewEvent:
        entry = self._by_cls[type(event)]
        return NewEvent(
            id=event_id,
            type=entry.name,
            data=self._encoder.encode(event),
            metadata=metadata,
            schema_version=entry.version,
        )

    def upcast(self, type_name: str, version: int, raw: RawEvent) -> RawEvent:
        entry = self[type_name]
        if version > entry.version:
            raise EventDecodeError(f"{type_name} v{version} is newer than this code knows (v{entry.version})")
        while version < entry.version:
            step = entry.upcasters.get(version)
            if step is None:
                raise EventDecodeError(f"{type_name}: no upcaster from version {version}")
            raw = step(raw)
            version += 1
        return raw

    def decode(self, recorded: RecordedEvent) -> Any:
        """The current Struct for a stored event, upcasting old versions."""
        entry = self[recorded.type]
        try:
            if recorded.schema_version == entry.version:
                return entry.decoder.decode(recorded.data)
            raw = msgspec.json.decode(recorded.data)
            if not isinstance(raw, dict):  # upcasters work on a dict
                raise EventDecodeError(
                    f"{recorded.type} v{recorded.schema_version} at {recorded.stream}@{recorded.revision}: "
                    "data is not a JSON object"
                )
            return msgspec.convert(self.upcast(recorded.type, recorded.schema_version, raw), entry.cls)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise EventDecodeError(
                f"{recorded.type} v{recorded.schema_version} at {recorded.stream}@{recorded.revision}: {exc}"
            ) from exc

    def decode_raw(self, recorded: RecordedEvent) -> RawEvent:
        """The event's data as a dict at the current schema version (for projections)."""
        try:
            raw = msgspec.json.decode(recorded.data)
        except msgspec.DecodeError as exc:
            raise EventDecodeError(f"{recorded.type}: data is not JSON: {exc}") from exc
        if not isinstance(raw, dict):
            raise EventDecodeError(f"{recorded.type}: data is not a JSON object")
        return self.upcast(recorded.type, recorded.schema_version, raw)


def _register_all(registry: EventRegistry, classes: Iterable[type[msgspec.Struct]]) -> None:
    for cls in classes:
        registry.register(cls)


def _without_card_token(raw: RawEvent, field_name: str) -> RawEvent:
    """Drop a card token stored in clear by an old writer, so it goes no further
    (read models, workflow inputs, ``events read``). It is not exchanged for a
    reference here: an upcaster is pure (no vault call on every read), and a
    saga started from such an event is declined ("no payment method on file")
    rather than charging a card on a token the service should not have kept."""
    kept = {k: v for k, v in raw.items() if k != field_name}
    return {**kept, "payment_method_id": raw.get("payment_method_id", "")}


def build_registry() -> EventRegistry:
    """Every event type of the domain, at its current schema version."""
    registry = EventRegistry()
    _register_all(
        registry,
        [
            orders.OrderShippingAddressChanged,
            orders.OrderStockReserved,
            orders.OrderPaymentAuthorised,
            orders.OrderConfirmed,
            orders.OrderShipped,
            orders.OrderRejected,
            inventory.ProductRegistered,
            inventory.StockAdded,
            inventory.StockReserved,
            inventory.StockReleased,
            inventory.StockCommitted,
            payments.PaymentAuthorised,
            payments.PaymentDeclined,
            payments.PaymentVoided,
            payments.PaymentCaptured,
            payments.PaymentRefunded,
            payments.LateAuthorisationVoided,
        ],
    )
    # Version history kept on purpose, as the worked example of upcasting:
    # v1 OrderPlaced had no payment token (orders before payments existed), and
    # v1 OrderCancelled had no previous_status;
    # OrderPlaced v2 and OrderLinesChanged v1 had no product name on their lines;
    # OrderPlaced v3 and PaymentRequested v1 held the card token itself.
    registry.register(orders.OrderPlaced, version=4)
    registry.register(orders.OrderLinesChanged, version=2)
    registry.register(orders.OrderCancelled, version=2)
    registry.register(payments.PaymentRequested, version=2)

    @registry.upcaster("OrderPlaced", 1)
    def _order_placed_v1(raw: RawEvent) -> RawEvent:
        # No token was recorded: the gateway declines an empty token, never charges blindly.
        return {**raw, "payment_token": raw.get("payment_token", "")}

    def _lines_without_names(raw: RawEvent) -> RawEvent:
        # The name was not recorded; looking it up now could give a later name, so none.
        return {**raw, "lines": [{**line, "name": line.get("name")} for line in raw.get("lines", ())]}

    registry.upcaster("OrderPlaced", 2)(_lines_without_names)
    registry.upcaster("OrderLinesChanged", 1)(_lines_without_names)

    @registry.upcaster("OrderPlaced", 3)
    def _order_placed_v3(raw: RawEvent) -> RawEvent:
        return _without_card_token(raw, "payment_token")

    @registry.upcaster("PaymentRequested", 1)
    def _payment_requested_v1(raw: RawEvent) -> RawEvent:
        return _without_card_token(raw, "token")

    @registry.upcaster("OrderCancelled", 1)
    def _order_cancelled_v1(raw: RawEvent) -> RawEvent:
        return {**raw, "previous_status": raw.get("previous_status", "unknown")}

    return registry


registry = build_registry()
"""The process-wide registry. Built from pure definitions only: no I/O."""
